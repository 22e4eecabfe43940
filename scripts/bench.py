"""galleryfs benchmarks (issue 4): the mount and the CLI against plain baselines.

Starts its own registry on loopback, pushes generated models (a 1 GiB safetensors file
of 4 MiB tensors, a second one, a multi-file model, a gallery of small models with three
tags each), then measures goals G1..G11 side by side with their baselines, repeated, and
prints one table (median of the repeats). `--json FILE` also writes the figures.

"Cold" means a fresh mount with an empty --cache-dir and the kernel page cache dropped
(`echo 3 > /proc/sys/vm/drop_caches`, root only; the output says when it could not).
Where a measurement cannot run (the mount does not come up, a tool is missing) its rows
say "n/a (reason)"; the other rows still run. Mounts and the registry are always torn
down, also on errors and Ctrl-C.

    scripts/bench [--no-setup] [--quick] [--repeat N] [--json FILE] [--keep]

Run from the repository root as a module (`python -m scripts.bench`, which
scripts/bench does), so that `tests.registry_harness` imports like any package.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Goals G1..G11 are measured here; the scale goals of issue 15 (P1..P7) each live in a
# module of scripts/scale/ that adds its set-up, steps and rows (scripts/scale/__init__.py).
from scripts.scale import EXTENSIONS

ROOT = Path(__file__).resolve().parent.parent

PY = sys.executable
FIO_DIR = ROOT / "scripts" / "fio"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1e6
STATS_XATTR = "user.galleryfs.stats"
FLUSH_XATTR = "user.galleryfs.flush"
DEFAULT_READAHEAD_CAP = 64 * MiB
GOALS = [f"G{i}" for i in range(1, 12)] + [g for ext in EXTENSIONS for g in ext.GOALS]
# Warm passes per side and repeat for G3 (alternating galleryfs and the local file).
G3_PASSES = 3
RAND_RUNTIME = 10  # s: a cap on the random-read job (bytes are compared, not time)


class BenchError(Exception):
    """A measurement could not run; its rows become n/a with this message."""


# ---- sizes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    tensor: int = 4 * MiB
    big_tensors: int = 256  # 1 GiB
    multi_files: int = 8
    multi_file_size: int = 64 * MiB  # 512 MiB in all
    zoo_models: int = 200
    zoo_tags: tuple[str, ...] = ("v1", "v2", "latest")
    zoo_file: int = 16 * KiB
    ttfb_files: int = 20
    rand_io: int = 16 * MiB

    @property
    def big(self) -> int:
        return self.tensor * self.big_tensors

    @classmethod
    def quick(cls) -> Sizes:
        return cls(big_tensors=16, multi_files=4, multi_file_size=8 * MiB, zoo_models=20,
                   ttfb_files=10, rand_io=2 * MiB)


# ---- small helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:160]


def mib_list(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs) or "none"


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
        what: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what or cmd[0]} timed out after {timeout:g}s") from None
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found") from None
    if proc.returncode != 0:
        raise BenchError(f"{what or cmd[0]} failed: {first_line(proc.stderr or proc.stdout)}")
    return proc


def galleryfs_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
    return run([PY, "-m", "galleryfs", *args], timeout=timeout, env=env,
               what=f"galleryfs {args[0]}")


class PageCache:
    """Drops the kernel page cache (dentries, inodes, pages) when allowed to."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.drop()

    @property
    def works(self) -> bool:
        return self.reason is None

    def drop(self) -> None:
        os.sync()
        if self.reason is not None:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            self.reason = f"cannot drop the page cache ({exc.strerror}; needs root)"


def proactive_reclaim() -> str | None:
    """A DAMON context paging out memory it sees idle (set up by the VM's host, not us):
    page-cache pages can then vanish within seconds, and warm re-reads find holes."""
    for state in Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state"):
        try:
            if state.read_text().strip() != "on":
                continue
            actions = {a.read_text().strip() for a in state.parent.glob(
                "contexts/*/schemes/*/action")}
        except OSError:
            continue
        if "pageout" in actions:
            return (f"DAMON proactive reclaim is on ({state.parent}: pageout of idle memory): "
                    "warm page-cache rows (G3) can find pages already paged out")
    return None


# ---- test data ------------------------------------------------------------------------------


def write_safetensors(path: Path, n_tensors: int, tensor_bytes: int, seed: int) -> None:
    """A safetensors file of float32 tensors, deterministic random, written tensor by tensor."""
    import numpy as np

    count = tensor_bytes // 4
    cols = 1024 if count % 1024 == 0 else 1
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "galleryfs-bench"}}
    for i in range(n_tensors):
        header[f"model.layers.{i:04d}.weight"] = {
            "dtype": "F32", "shape": [count // cols, cols],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _ in range(n_tensors):
            f.write(rng.standard_normal(count, dtype=np.float32).tobytes())
    os.replace(tmp, path)


def generate(data: Path, sizes: Sizes) -> bool:
    """The models, kept under data/ between runs (regenerated when the sizes change).
    True when they were (re)generated."""
    stamp = data / "stamp.json"
    want = json.dumps({"format": 1, "sizes": repr(sizes)})
    if stamp.is_file() and stamp.read_text() == want:
        return False
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.monotonic()
    for name, seed in (("big", 1), ("big2", 2)):
        d = data / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "bench", "name": name}))
        write_safetensors(d / "model.safetensors", sizes.big_tensors, sizes.tensor, seed)
    multi = data / "multi"
    multi.mkdir()
    per_file = max(1, sizes.multi_file_size // sizes.tensor)
    weight_map = {}
    for i in range(sizes.multi_files):
        name = f"model-{i + 1:05d}-of-{sizes.multi_files:05d}.safetensors"
        write_safetensors(multi / name, per_file, sizes.tensor, 100 + i)
        for t in range(per_file):
            weight_map[f"model.layers.{t:04d}.weight"] = name
    (multi / "config.json").write_text(json.dumps({"model_type": "bench", "name": "multi"}))
    (multi / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for i in range(sizes.zoo_models):
        d = data / "zoo" / f"m{i:03d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "bench", "index": i}))
        write_safetensors(d / "model.safetensors", 1, sizes.zoo_file, 1000 + i)
    stamp.write_text(want)
    log(f"generated test models in {data} ({time.monotonic() - t0:.1f}s)")
    return True


@dataclass
class Pushed:
    host: str
    files: dict[str, dict[str, tuple[str, int]]]  # model -> path -> (digest, size)


async def push_all(host: str, data: Path, sizes: Sizes, locations: Path) -> Pushed:
    """Push the models in-process (one client, concurrent small pushes), then tag."""
    import trio

    from galleryfs import gallery
    from galleryfs.gallery.locations import BlobLocations
    from galleryfs.reference import parse
    from galleryfs.registry.client import ClientOptions, RegistryClient

    files: dict[str, dict[str, tuple[str, int]]] = {}
    opts = ClientOptions(plain_http=True, timeout=600)
    async with RegistryClient(host, opts) as client:
        locs = BlobLocations(locations)
        for name in ("big", "big2", "multi"):
            await gallery.push(client, data / name, parse(f"{host}/bench/{name}:v1"), locations=locs)
        limiter = trio.CapacityLimiter(8)

        async def one(i: int) -> None:
            async with limiter:
                ref = parse(f"{host}/zoo/m{i:03d}:{sizes.zoo_tags[0]}")
                await gallery.push(client, data / "zoo" / f"m{i:03d}", ref, locations=locs)
                await gallery.tag(client, ref, list(sizes.zoo_tags[1:]))

        async with trio.open_nursery() as nursery:
            for i in range(sizes.zoo_models):
                nursery.start_soon(one, i)
        names = ["bench/big", "bench/big2", "bench/multi"]
        names += [f"zoo/m{i:03d}" for i in range(sizes.zoo_models)]
        for repo in names:
            rev = await gallery.resolve(client, parse(f"{host}/{repo}:v1"))
            files[repo] = {f.path: (f.digest, f.size) for f in rev.files}
    return Pushed(host, files)


# ---- the mount ----------------------------------------------------------------------------


def _daemon_pid(mountpoint: str, cache_dir: str) -> int | None:
    """The mount daemon: a galleryfs mount process naming the mountpoint on its command
    line, or (the background child reads its configuration from stdin) one holding a file
    under the mount's own cache directory open (its log)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if not any("galleryfs" in a for a in argv) or not any("mount" in a for a in argv):
            continue
        if any(a == "unmount" for a in argv):
            continue
        if mountpoint in argv and "--child" in " ".join(argv):
            return int(entry.name)
        try:
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(cache_dir + "/"):
                        return int(entry.name)
        except OSError:
            continue
    return None


def _exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind `pidfd` exits within `timeout` seconds (a pidfd turns
    readable when it does)."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def timed_get(url: str, size: int, what: str) -> float:
    """Seconds of one streaming GET of `size` bytes, to memory, discarded."""
    import httpx

    with httpx.Client(timeout=120) as client:
        t0 = time.perf_counter()
        got = 0
        with client.stream("GET", url) as r:
            r.raise_for_status()
            for piece in r.iter_raw(MiB):
                got += len(piece)
        dt = time.perf_counter() - t0
    if got != size:
        raise BenchError(f"{what} read {got} of {size} bytes")
    return dt


def sectors_written(path: Path) -> int | None:
    """Sectors written so far by the block device holding `path` (/sys/dev/block)."""
    dev = path.stat().st_dev
    try:
        fields = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()
        return int(fields[6])
    except (OSError, IndexError, ValueError):
        return None


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    except OSError:
        return None
    return None


class Mount:
    """One `galleryfs mount` (background daemon), unmounted on exit."""

    #: How long an unmount waits for the daemon to exit before stopping it, and then
    #: for each signal to take.
    EXIT_WAIT = 15.0
    STOP_WAIT = 10.0

    def __init__(self, bench: Bench, name: str, cache_dir: Path, *, refresh: float = 30.0,
                 extra: list[str] | None = None) -> None:
        self.bench = bench
        self.extra = extra or []
        self.path = bench.run_dir / "mnt" / name
        self.cache_dir = cache_dir
        self.refresh = refresh
        self.pid: int | None = None
        # The daemon is not our child: a pidfd pins it, so that a pid reused after it
        # exits is never signalled.
        self.pidfd: int | None = None
        self.mounted = False

    def __enter__(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        args = ["mount", self.bench.host, str(self.path), "--plain-http",
                "--cache-dir", str(self.cache_dir), "--refresh", f"{self.refresh:g}"]
        if self.bench.args.chunk_size:
            args += ["--chunk-size", self.bench.args.chunk_size]
        args += self.extra
        self.bench.mounts.append(self)
        try:
            galleryfs_cli(*args, timeout=90)
            if not os.path.ismount(self.path):
                raise BenchError(f"galleryfs mount returned but {self.path} is not a mount point")
        except BenchError:
            # A mount that half-started must not stay up on a cache directory that the
            # next mount will use.
            self.watch(_daemon_pid(str(self.path), str(self.cache_dir.resolve())))
            self.unmount()
            raise
        self.mounted = True
        self.watch(_daemon_pid(str(self.path), str(self.cache_dir.resolve())))
        return self

    def watch(self, pid: int | None) -> None:
        """Take `pid` as this mount's daemon, to be waited for (and stopped) at unmount."""
        self.pid = pid
        if pid is not None:
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:  # gone already: nothing to wait for
                self.pid = None

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def unmount(self) -> None:
        if self in self.bench.mounts:
            self.bench.mounts.remove(self)
        if os.path.ismount(self.path) or self.mounted:
            for attempt in range(5):
                try:
                    galleryfs_cli("unmount", str(self.path), timeout=60)
                    break
                except BenchError as exc:
                    # Busy: something (an indexer, a stray `ls`) still has it open for a moment.
                    if attempt < 4 and "busy" in str(exc):
                        time.sleep(0.5)
                        continue
                    log(f"unmount {self.path}: {exc}; lazy unmount")
                    subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True,
                                   timeout=30)
                    break
        self.mounted = False
        self.stop_daemon()

    def stop_daemon(self) -> None:
        """Wait for the daemon to exit; one still running after EXIT_WAIT is stopped and
        noted: it would be writing into the cache directory while the next mount reads it,
        and that mount's figures would be someone else's."""
        fd, self.pidfd = self.pidfd, None
        if fd is None:
            return
        try:
            if _exited(fd, self.EXIT_WAIT):
                return
            how = "it did not exit even on SIGKILL"
            try:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    signal.pidfd_send_signal(fd, sig)
                    if _exited(fd, self.STOP_WAIT):
                        how = f"stopped with {sig.name}"
                        break
            except OSError as exc:
                how = f"it could not be stopped ({exc.strerror})"
            note = (f"the daemon of mount {self.path.name!r} (pid {self.pid}) was still running "
                    f"{self.EXIT_WAIT:g} s after its unmount; {how}")
            log(note)
            self.bench.notes.append(note)
        finally:
            os.close(fd)

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(os.getxattr(self.path, STATS_XATTR))
        except OSError as exc:
            raise BenchError(f"no {STATS_XATTR} on the mount root ({exc.strerror})") from None

    def flush(self) -> float:
        """Seconds the daemon took to write what its disk cache was owed (write-behind),
        as `galleryfs unmount` has it do first."""
        t0 = time.perf_counter()
        try:
            os.getxattr(self.path, FLUSH_XATTR)
        except OSError as exc:
            raise BenchError(f"no {FLUSH_XATTR} on the mount root ({exc.strerror})") from None
        return time.perf_counter() - t0

    def store_time(self, before: dict[str, Any]) -> tuple[float, int]:
        """Since the `before` stats: seconds spent writing chunks to the disk cache, chunks
        written."""
        now = self.stats()
        return (float(now.get("store_write_s", 0)) - float(before.get("store_write_s", 0)),
                int(now.get("stores", 0)) - int(before.get("stores", 0)))

    def registry_bytes(self) -> int:
        stats = self.stats()
        if "registry_bytes" not in stats:
            raise BenchError(f"{STATS_XATTR} has no registry_bytes (keys: {', '.join(sorted(stats))})")
        return int(stats["registry_bytes"])

    def file(self, repo: str, path: str, tag: str = "v1") -> str:
        return str(self.path / repo / tag / path)


# ---- fio --------------------------------------------------------------------------------


def _fio_name(path: str) -> str:
    return path.replace(":", "\\:")  # ':' separates file names in fio


def fio(job: str, timeout: float = 600, **env: str) -> list[dict[str, Any]]:
    """Run a job file; per job: io_bytes and runtime (s) of its reads."""
    proc = run(["fio", "--readonly", "--output-format=json", str(FIO_DIR / job)], timeout=timeout,
               env={k: _fio_name(v) if k.startswith("FILE") else v for k, v in env.items()},
               what=f"fio {job}")
    text = proc.stdout
    try:
        data = json.loads(text[text.index("{"):])
    except ValueError:
        raise BenchError(f"fio {job}: output is not JSON: {first_line(text)}") from None
    out = []
    for j in data.get("jobs", []):
        r = j["read"]
        if j.get("error"):
            raise BenchError(f"fio {job}: job {j.get('jobname')} error {j['error']}")
        out.append({"io_bytes": int(r["io_bytes"]), "runtime": max(r["runtime"], 1) / 1000})
    if not out or not any(j["io_bytes"] for j in out):
        raise BenchError(f"fio {job}: read nothing")
    return out


def fio_seq(path: str) -> float:
    """Throughput (MB/s) of a sequential 1 MiB-read pass over a whole file."""
    (job,) = fio("seq-read.fio", FILE=path)
    return job["io_bytes"] / job["runtime"] / MB


# ---- results ------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    goal_id: str
    metric: str
    unit: str  # MB/s, s, ms, bytes
    goal: str
    galleryfs: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    met: bool | None = None
    na: str | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "bytes":
        return f"{value / MiB:.1f} MiB" if value >= 0.1 * MiB else f"{value / KiB:.1f} KiB"
    return f"{value:.3g} {unit}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.3f}×" if r < 0.1 else f"{r:.2f}×"


# ---- the bench ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = Sizes.quick() if args.quick else Sizes()
        self.repeat = args.repeat or (1 if args.quick else 3)
        self.workdir = Path(args.workdir).resolve() if args.workdir else ROOT / ".bench"
        self.data = self.workdir / ("data-quick" if args.quick else "data")
        self.run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        self.run_dir = self.workdir / f"run-{self.run_id}"
        # The registry's storage outlives a run (pushing the models again is slow); every
        # measured push goes to a repository named after the run, so it is never there yet.
        self.registry_dir = self.workdir / ("registry-quick" if args.quick else "registry")
        self.mounts: list[Mount] = []
        self.registry: Any = None
        self.host = ""
        self.pushed: Pushed | None = None
        self.samples: dict[str, list[float]] = {}
        self.failed: dict[str, str] = {}
        self.notes: list[str] = []
        self.cache = PageCache()
        reclaim = proactive_reclaim()
        if reclaim:
            self.notes.append(reclaim)
        self._cache_seq = 0

    # -- plumbing --
    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def fresh_cache_dir(self) -> Path:
        self._cache_seq += 1
        return self.run_dir / "cache" / f"c{self._cache_seq:03d}"

    def drop_caches(self) -> None:
        self.cache.drop()

    def file_size(self, repo: str, path: str) -> int:
        assert self.pushed is not None
        return self.pushed.files[repo][path][1]

    def blob_url(self, repo: str, path: str) -> str:
        assert self.pushed is not None
        digest = self.pushed.files[repo][path][0]
        return f"http://{self.host}/v2/{repo}/blobs/{digest}"

    def section(self, goals: list[str], fn: Callable[[int], None]) -> None:
        """Run fn(repeat_index) for every repeat; a failure marks the goals n/a."""
        if all(g in self.failed for g in goals):
            return
        for i in range(self.repeat):
            try:
                fn(i)
            except BenchError as exc:
                reason = str(exc)
                log(f"{'/'.join(goals)}: {reason}")
                for g in goals:
                    self.failed.setdefault(g, reason)
                return
            finally:
                for m in list(self.mounts):
                    m.unmount()
                shutil.rmtree(self.run_dir / "cache", ignore_errors=True)
                shutil.rmtree(self.run_dir / "out", ignore_errors=True)

    # -- set-up --
    def setup(self) -> None:
        import trio

        from tests.registry_harness import Registry

        if generate(self.data, self.sizes) or self.args.fresh_registry:
            shutil.rmtree(self.registry_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.registry = Registry("plain", workdir=self.registry_dir)
        self.registry.start()
        self.host = self.registry.host
        t0 = time.monotonic()
        self.pushed = trio.run(push_all, self.host, self.data, self.sizes,
                               self.run_dir / "locations.json")
        log(f"registry {self.registry.url} ({self.registry_dir}): pushed bench/big, bench/big2, "
            f"bench/multi and {self.sizes.zoo_models} zoo models ({time.monotonic() - t0:.1f}s)")

    def setup_extensions(self) -> None:
        """Each scale module's own set-up (extra models, tools); a failure marks its goals
        n/a and the others still run."""
        only = set(self.args.only or GOALS)
        for ext in EXTENSIONS:
            if not only.intersection(ext.GOALS):
                continue  # --only leaves it out: no extra models pushed for it
            try:
                ext.setup(self)
            except BenchError as exc:
                log(f"{'/'.join(ext.GOALS)}: {exc}")
                for g in ext.GOALS:
                    self.failed.setdefault(g, str(exc))

    def close(self) -> None:
        for m in list(self.mounts):
            with contextlib.suppress(Exception):
                m.unmount()
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.stop()
        if not self.args.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- measurements --
    def g1_g3_g4_g6seq_g9(self, i: int) -> None:
        """Cold sequential read (G1) with registry bytes (G6) and daemon RSS (G9), then the
        warm re-read (G3), then a remount over the full disk cache (G4)."""
        size = self.file_size("bench/big", "model.safetensors")
        local = str(self.data / "big" / "model.safetensors")
        cache = self.fresh_cache_dir()
        with Mount(self, "seq", cache) as m:
            path = m.file("bench/big", "model.safetensors")
            os.stat(path)  # metadata first: registry bytes count file bytes only
            before = m.registry_bytes()
            self.drop_caches()
            st0 = g1_stats = m.stats()
            self.add("g1.gfs", fio_seq(path))
            self.add_store_time("g1", m, st0)
            self.add("g6s.gfs", m.registry_bytes() - before)
            self.add("g6s.base", size)
            if m.pid is None:
                self.failed.setdefault("G9", "daemon process not found (no galleryfs mount process "
                                       "with the mountpoint or the cache dir open)")
            else:
                hwm = vm_hwm(m.pid)
                if hwm is not None:
                    self.add("g9.gfs", hwm)
            cap = m.stats().get("readahead_cap")
            if not isinstance(cap, int):
                cap = None
            self.add("g9.cap", cap if cap is not None else DEFAULT_READAHEAD_CAP)
            if cap is None and i == 0:
                self.notes.append("G9: the stats xattr has no read-ahead cap; used 64 MiB")
            # G3: the same file again, from the kernel's page cache (keep_cache). Passes
            # alternate with passes over the local file (read once first, into the page
            # cache), so both sides see the same moment of this shared machine; the median
            # pass of each side counts. The first re-read is also reported on its own.
            fio_seq(local)
            gfs: list[float] = []
            base: list[float] = []
            for k in range(G3_PASSES):
                st0 = m.stats()
                gfs.append(fio_seq(path))
                st1 = m.stats()
                base.append(fio_seq(local))
                if k == 0:
                    served = sum(int(st1.get(c, 0)) - int(st0.get(c, 0)) for c in (
                        "memory_hits", "memory_misses", "disk_hits", "fetches"))
                    self.add("g3.first", gfs[0] / base[0])
                    self.add("g3.first_served", served)
            self.add("g3.gfs", statistics.median(gfs))
            self.add("g3.base", statistics.median(base))
            self.add_fill("g1", m, g1_stats)
        # G1 baseline: one streaming GET of the blob, to memory, discarded.
        url = self.blob_url("bench/big", "model.safetensors")
        # The same cold start as galleryfs had: the registry reads the blob from disk.
        self.drop_caches()
        self.add("g1.base", size / timed_get(url, size, "baseline GET") / MB)
        # Context, not a goal: the same GET while fio writes to the same disk at the rate
        # galleryfs read (and so wrote into its disk cache) in this repeat.
        got_mb, wrote_mb = self.contended_get(url, size, self.samples["g1.gfs"][-1])
        self.add("g1.contended", got_mb)
        if wrote_mb is not None:
            self.add("g1.contended_writes", wrote_mb)
        # ... and the same cold read with the disk cache off (--cache-size 0).
        with Mount(self, "nodisk", self.fresh_cache_dir(), extra=["--cache-size", "0"]) as m:
            path = m.file("bench/big", "model.safetensors")
            os.stat(path)
            self.drop_caches()
            self.add("g1.nodisk", fio_seq(path))
        # Context, not the goal: a remount over the cache as the cold read left it. Its
        # write-behind leaves out what the kernel dropped from its page cache before the
        # fill reached it (never fetched again: writeback.py; on these VMs, DAMON's
        # page-outs, up to 316 MiB of 1 GiB once), and such a remount fetches those.
        try:
            mbps, mib = self.remount_read("as-left", cache)
            self.add("g4.as_left", mbps)
            self.add("g4.as_left_mib", mib)
        except BenchError as exc:
            self.notes.append(f"G4 (repeat {i + 1}): the as-left remount failed: "
                              f"{first_line(str(exc))}")
        # G4 reads a full disk cache: `galleryfs warm` fetches what is still missing, in
        # a mount of its own (the chunks it fetches stay in that daemon's memory, and G4
        # is a remount).
        try:
            with Mount(self, "warm", cache) as m:
                out = galleryfs_cli("warm", m.file("bench/big", "model.safetensors"), "--json",
                                    timeout=600).stdout
            try:
                self.add("g4.warmed_mib", float(json.loads(out)["fetchedBytes"]) / MiB)
            except (ValueError, KeyError, TypeError):
                raise BenchError("`galleryfs warm --json` gave no fetchedBytes") from None
        except BenchError as exc:
            self.add("g4.warm_failed", 1)
            self.notes.append(f"G4 (repeat {i + 1}): warming the cache failed: "
                              f"{first_line(str(exc))}; the timed remount's registry MiB "
                              "in G4's note say what it fetched")
        mbps, mib = self.remount_read("g4", cache)
        self.add("g4.gfs", mbps)
        self.add("g4.refetched_mib", mib)
        self.drop_caches()
        self.add("g4.base", fio_seq(local))

    def remount_read(self, name: str, cache: Path) -> tuple[float, float]:
        """A cold fio read of the 1 GiB file through a fresh mount over `cache`, page
        cache dropped: MB/s, and MiB the mount fetched from the registry meanwhile."""
        with Mount(self, name, cache) as m:
            path = m.file("bench/big", "model.safetensors")
            os.stat(path)
            before = m.registry_bytes()
            self.drop_caches()
            mbps = fio_seq(path)
            return mbps, (m.registry_bytes() - before) / MiB

    def add_store_time(self, key: str, m: Mount, before: dict[str, Any]) -> None:
        write, stores = m.store_time(before)
        if stores:
            self.add(f"{key}.store_ms", write / stores * 1000)

    def add_fill(self, key: str, m: Mount, before: dict[str, Any]) -> None:
        """What the write-behind did for the read since `before`: the flush an unmount
        waits for, then chunks written and how many were not (dropped from the page
        cache)."""
        names = ("fill_chunks", "fill_dropped", "fill_s")
        if any(name not in before for name in names):  # a daemon without the write-behind
            return
        self.add(f"{key}.flush_s", m.flush())
        now = m.stats()
        for name in names:
            self.add(f"{key}.{name}", float(now[name]) - float(before[name]))

    def contended_get(self, url: str, size: int, rate_mb: float) -> tuple[float, float | None]:
        """MB/s of a cold streaming GET of the blob while an O_DIRECT writer asks for
        `rate_mb` MB/s on the disk of the registry's storage and the run's caches, and
        the MB/s the disk wrote meanwhile (None when the block device's counters are not
        found): the scheduler favours reads, so the writer may get less than it asks."""
        target = self.run_dir / "contend.dat"
        self.drop_caches()
        writer = subprocess.Popen(
            ["fio", "--name=contend", f"--filename={_fio_name(str(target))}", f"--size={size}",
             "--bs=1M", "--rw=write", "--direct=1", "--ioengine=psync",
             f"--rate={max(1, int(rate_mb * MB))}", "--time_based", "--runtime=300",
             "--output-format=terse"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # Bounded wait for the writer to be writing.
            deadline = time.monotonic() + 30
            while not (target.exists() and target.stat().st_blocks):
                if writer.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("fio writer did not start: "
                                     f"{first_line(writer.stderr.read() if writer.stderr else '')}")
                time.sleep(0.01)
            w0 = sectors_written(self.run_dir)
            dt = timed_get(url, size, "contended GET")
            w1 = sectors_written(self.run_dir)
        finally:
            writer.terminate()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
            target.unlink(missing_ok=True)
        wrote = (w1 - w0) * 512 / dt / MB if w0 is not None and w1 is not None else None
        return size / dt / MB, wrote

    def g10(self, i: int) -> None:
        with Mount(self, "two", self.fresh_cache_dir()) as m:
            a = m.file("bench/big", "model.safetensors")
            b = m.file("bench/big2", "model.safetensors")
            os.stat(a)
            os.stat(b)
            self.drop_caches()
            jobs = fio("two-readers.fio", FILE_A=a, FILE_B=b)
        total = sum(j["io_bytes"] for j in jobs)
        self.add("g10.gfs", total / max(j["runtime"] for j in jobs) / MB)

    def g6_random(self, i: int) -> None:
        with Mount(self, "rand", self.fresh_cache_dir()) as m:
            path = m.file("bench/big", "model.safetensors")
            os.stat(path)
            before = m.registry_bytes()
            self.drop_caches()
            (job,) = fio("rand-read.fio", FILE=path, IO_SIZE=str(self.sizes.rand_io),
                         RUNTIME=str(RAND_RUNTIME))
            self.add("g6r.gfs", m.registry_bytes() - before)
            self.add("g6r.base", job["io_bytes"])
            self.add("g6r.time", job["runtime"])

    def g5(self, i: int) -> None:
        # numpy before the page cache is dropped: safetensors imports it on the first
        # get_tensor, which would time its import from a cold disk too.
        import numpy  # noqa: F401
        from safetensors import safe_open

        name = f"model.layers.{self.sizes.big_tensors // 2:04d}.weight"
        with Mount(self, "tensor", self.fresh_cache_dir()) as m:
            path = m.file("bench/big", "model.safetensors")
            os.stat(path)
            before = m.registry_bytes()
            self.drop_caches()
            t0 = time.perf_counter()
            with safe_open(path, framework="numpy") as f:
                tensor = f.get_tensor(name)
            dt = time.perf_counter() - t0
            if tensor.nbytes != self.sizes.tensor:
                raise BenchError(f"get_tensor returned {tensor.nbytes} bytes")
            self.add("g5b.gfs", m.registry_bytes() - before)
            self.add("g5b.base", self.file_size("bench/big", "model.safetensors"))
            self.add("g5t.gfs", dt)
        out = self.run_dir / "out" / "pull"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.drop_caches()
        t0 = time.perf_counter()
        galleryfs_cli("pull", f"{self.host}/bench/big:v1", str(out), "--plain-http", "--quiet",
                      env=self.cli_env())
        self.add("g5t.base", time.perf_counter() - t0)

    def g2(self, i: int) -> None:
        import oras.client

        assert self.pushed is not None
        want = sum(s for _, s in self.pushed.files["bench/multi"].values())

        def read_all(m: Mount) -> float:
            assert self.pushed is not None
            paths = [m.file("bench/multi", p) for p in sorted(self.pushed.files["bench/multi"])]
            for p in paths:
                os.stat(p)
            self.drop_caches()
            buf = bytearray(MiB)
            t0 = time.perf_counter()
            total = 0
            for p in paths:
                with open(p, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
            dt = time.perf_counter() - t0
            if total != want:
                raise BenchError(f"read {total} of {want} bytes through the mount")
            return dt

        with Mount(self, "multi", self.fresh_cache_dir()) as m:
            st0 = m.stats()
            self.add("g2.gfs", read_all(m))
            self.add_store_time("g2", m, st0)
            self.add_fill("g2", m, st0)
        # Context, not the goal: the same read with the disk cache off.
        with Mount(self, "multi-nodisk", self.fresh_cache_dir(), extra=["--cache-size", "0"]) as m:
            self.add("g2.nodisk", read_all(m))
        out = self.run_dir / "out" / "oras"
        out.mkdir(parents=True)
        self.drop_caches()
        client = oras.client.OrasClient(hostname=self.host, insecure=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            client.pull(target=f"{self.host}/bench/multi:v1", outdir=str(out))
        self.add("g2.base", time.perf_counter() - t0)
        got = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        if got != want:
            raise BenchError(f"oras pull wrote {got} of {want} bytes")

    def g7_g8(self, i: int) -> None:
        import httpx

        n = self.sizes.zoo_models
        with Mount(self, "zoo", self.fresh_cache_dir(), refresh=300) as m:
            self.drop_caches()
            t0 = time.perf_counter()
            run(["ls", "-R", str(m.path / "zoo")], timeout=300, what="ls -R")
            self.add("g8c.gfs", time.perf_counter() - t0)
            t0 = time.perf_counter()
            proc = run(["ls", "-R", str(m.path / "zoo")], timeout=300, what="ls -R")
            self.add("g8w.gfs", (time.perf_counter() - t0) * 1000)
            listed = proc.stdout.count("model.safetensors")
            if listed != n:
                raise BenchError(f"ls -R listed {listed} model files, expected {n}")
            # G7: open + read 1 byte of files whose bytes were never read (metadata known).
            times = []
            for k in range(self.sizes.ttfb_files):
                path = m.file(f"zoo/m{k:03d}", "model.safetensors")
                os.stat(path)
                t0 = time.perf_counter()
                fd = os.open(path, os.O_RDONLY)
                try:
                    if len(os.read(fd, 1)) != 1:
                        raise BenchError(f"{path}: no first byte")
                finally:
                    os.close(fd)
                times.append((time.perf_counter() - t0) * 1000)
            self.add("g7.gfs", statistics.median(times))
        # Baselines: the same listing requests, one after another, and Range GETs.
        self.drop_caches()
        accept = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.oci.image.index.v1+json")
        base = f"http://{self.host}"
        t0 = time.perf_counter()
        with httpx.Client(base_url=base, timeout=60) as client:
            repos: list[str] = []
            url: str | None = "/v2/_catalog?n=1000"
            while url:
                r = client.get(url)
                r.raise_for_status()
                repos += r.json().get("repositories") or []
                link = r.headers.get("link")
                url = link.split(";")[0].strip("<> ") if link else None
            for repo in [r for r in repos if r.startswith("zoo/")]:
                r = client.get(f"/v2/{repo}/tags/list?n=1000")
                r.raise_for_status()
                for tag in r.json().get("tags") or []:
                    client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": accept}
                               ).raise_for_status()
        self.add("g8c.base", time.perf_counter() - t0)
        with httpx.Client(timeout=60) as client:
            client.get(f"{base}/v2/").raise_for_status()  # warm connection
            times = []
            for k in range(self.sizes.ttfb_files):
                url = self.blob_url(f"zoo/m{k:03d}", "model.safetensors")
                t0 = time.perf_counter()
                r = client.get(url, headers={"Range": "bytes=0-0"})
                if r.status_code != 206 or len(r.content) != 1:
                    raise BenchError(f"Range GET answered {r.status_code}")
                times.append((time.perf_counter() - t0) * 1000)
        self.add("g7.base", statistics.median(times))

    def cli_env(self) -> dict[str, str]:
        # Own blob-location hints: a push must not mount blobs the user's pushes left.
        xdg = self.run_dir / "xdg"
        xdg.mkdir(parents=True, exist_ok=True)
        return {"XDG_CACHE_HOME": str(xdg)}

    def g11(self, i: int) -> None:
        import oras.client

        model = self.data / "big"
        size = sum(f.stat().st_size for f in model.iterdir())
        shutil.rmtree(self.run_dir / "xdg", ignore_errors=True)
        env = self.cli_env()
        ref = f"{self.host}/bench/push-{self.run_id}-{i}:v1"
        self.drop_caches()
        t0 = time.perf_counter()
        galleryfs_cli("push", str(model), ref, "--plain-http", "--quiet", env=env)
        first = time.perf_counter() - t0
        self.add("g11p.gfs", size / first / MB)
        t0 = time.perf_counter()
        galleryfs_cli("push", str(model), ref, "--plain-http", "--quiet", env=env)
        self.add("g11r.gfs", time.perf_counter() - t0)
        self.add("g11r.base", first)
        self.drop_caches()
        client = oras.client.OrasClient(hostname=self.host, insecure=True)
        cwd = os.getcwd()
        files = sorted(p.name for p in model.iterdir())
        os.chdir(model)
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                resp = client.push(target=f"{self.host}/bench/oras-{self.run_id}-{i}:v1", files=files)
            dt = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
        if getattr(resp, "status_code", 201) >= 400:
            raise BenchError(f"oras push answered HTTP {resp.status_code}")
        self.add("g11p.base", size / dt / MB)

    def measure(self) -> None:
        t = time.monotonic()
        steps: list[tuple[list[str], Callable[[int], None]]] = [
            (["G1", "G3", "G4", "G6", "G9"], self.g1_g3_g4_g6seq_g9),
            (["G10"], self.g10),
            (["G6"], self.g6_random),
            (["G5"], self.g5),
            (["G2"], self.g2),
            (["G7", "G8"], self.g7_g8),
            (["G11"], self.g11),
        ]
        for ext in EXTENSIONS:
            steps.extend(ext.steps(self))
        only = set(self.args.only or GOALS)
        for goals, fn in steps:
            t0 = time.monotonic()
            if goals == ["G6"] and "G6" in self.failed:
                continue
            if not only.intersection(goals):
                continue
            self.section(goals, fn)
            log(f"{'/'.join(goals)} done ({time.monotonic() - t0:.1f}s)")
        log(f"measurements took {time.monotonic() - t:.0f}s")

    # -- rows --
    def rows(self) -> list[Row]:
        s = self.samples
        rows: list[Row] = []

        def row(rid: str, metric: str, unit: str, goal: str, key: str, *, base: str | None = None,
                ratio: Callable[[float, float], float] | None = None,
                check: Callable[[Row], bool], gfs_agg: Callable[[list[float]], float] = statistics.median,
                note: str = "") -> None:
            gid = rid.split(".")[0]
            r = Row(rid, gid, metric, unit, goal, note=note)
            rows.append(r)
            g, b = s.get(key, []), s.get(base, []) if base else []
            if gid in self.failed:
                r.na = self.failed[gid]
            elif not g or (base and not b):
                r.na = "not measured"
            if r.na:
                return
            r.samples["galleryfs"] = g
            r.galleryfs = gfs_agg(g)
            if base:
                r.samples["baseline"] = b
                r.baseline = statistics.median(b)
                if ratio is not None:
                    rs = [ratio(x, y) for x, y in zip(g, b, strict=False)]
                    r.samples["ratio"] = rs
                    r.ratio = statistics.median(rs)
            r.met = bool(check(r))

        def div(x: float, y: float) -> float:
            return x / y

        big = f"{self.sizes.big // MiB} MiB" if self.sizes.big < GiB else f"{self.sizes.big // GiB} GiB"
        g1_note = ""
        if s.get("g1.contended") and s.get("g1.gfs"):
            ctx = statistics.median(s["g1.contended"])
            vs = statistics.median(x / y for x, y in zip(s["g1.gfs"], s["g1.contended"], strict=False))
            writes = (f" ({statistics.median(s['g1.contended_writes']):.0f} MB/s written)"
                      if s.get("g1.contended_writes") else "")
            g1_note = (f"the same GET while fio wrote O_DIRECT to the same disk{writes}, asking for "
                       f"galleryfs's rate (its disk cache writes as much as it reads): {ctx:.0f} MB/s; "
                       f"galleryfs read at {vs:.2f}× that")
        if s.get("g1.nodisk") and s.get("g1.base"):
            nodisk = statistics.median(s["g1.nodisk"])
            vs = statistics.median(x / y for x, y in zip(s["g1.nodisk"], s["g1.base"], strict=False))
            g1_note += (f"{'; ' if g1_note else ''}with the disk cache off (--cache-size 0) "
                        f"galleryfs read {nodisk:.0f} MB/s, {vs:.2f}× the GET")
        g1_store = self.store_note("g1", [self.sizes.big / MB / x for x in s.get("g1.gfs", [])])
        if g1_store:
            g1_note += f"{'; ' if g1_note else ''}{g1_store}"
        row("G1", f"cold sequential read, {big} file, fio 1 MiB (vs httpx GET to memory)", "MB/s",
            "≥ 0.7×", "g1.gfs", base="g1.base", ratio=div, check=lambda r: r.ratio >= 0.7,
            note=g1_note)
        g2_note = ""
        if s.get("g2.nodisk") and s.get("g2.base"):
            nodisk = statistics.median(s["g2.nodisk"])
            vs = statistics.median(x / y for x, y in zip(s["g2.nodisk"], s["g2.base"], strict=False))
            g2_note = (f"with the disk cache off (--cache-size 0) the same read took {nodisk:.2f} s, "
                       f"{vs:.2f}× oras")
        g2_store = self.store_note("g2", s.get("g2.gfs", []))
        if g2_store:
            g2_note += f"{'; ' if g2_note else ''}{g2_store}"
        row("G2", "read all files of a multi-file model, cold (vs oras pull to disk)", "s",
            "≤ 0.8× time", "g2.gfs", base="g2.base", ratio=div, check=lambda r: r.ratio <= 0.8,
            note=g2_note)
        g3_note = ""
        if s.get("g3.first"):
            g3_note = (f"median of {G3_PASSES} passes alternating with the local file; the first "
                       f"re-read after the cold read ran at {statistics.median(s['g3.first']):.2f}× "
                       f"(the daemon served {', '.join(str(int(x)) for x in s['g3.first_served'])} "
                       "reads in it: page-cache holes)")
        row("G3", "warm re-read, kernel cache (vs local file in page cache)", "MB/s",
            "≥ 0.8×", "g3.gfs", base="g3.base", ratio=div, check=lambda r: r.ratio >= 0.8,
            note=g3_note)
        g4_parts = []
        if s.get("g4.as_left"):
            g4_parts.append(
                f"a remount over the cache as the cold read left it read "
                f"{statistics.median(s['g4.as_left']):.0f} MB/s, with "
                f"{mib_list(s['g4.as_left_mib'])} MiB from the registry "
                "(chunks the kernel had dropped before the write-behind, G1's note)")
        if s.get("g4.warmed_mib") or s.get("g4.warm_failed"):
            warm = f"`galleryfs warm` then fetched {mib_list(s.get('g4.warmed_mib', []))} MiB"
            if s.get("g4.warm_failed"):
                warm += f" (it failed in {len(s['g4.warm_failed'])} repeat(s): notes)"
            g4_parts.append(warm)
        if s.get("g4.refetched_mib"):
            g4_parts.append(f"the timed remount fetched {mib_list(s['g4.refetched_mib'])} MiB "
                            "from the registry")
        g4_note = "; ".join(g4_parts)
        row("G4", "remount, disk cache full, page cache dropped (vs cold local file)", "MB/s",
            "≥ 0.45×", "g4.gfs", base="g4.base", ratio=div, check=lambda r: r.ratio >= 0.45,
            note=g4_note)
        row("G5.bytes", "get_tensor of one 4 MiB tensor, cold: registry bytes (vs file size)",
            "bytes", "≤ 0.05×", "g5b.gfs", base="g5b.base", ratio=div,
            check=lambda r: r.ratio <= 0.05)
        row("G5.time", "get_tensor of one 4 MiB tensor, cold: time (vs galleryfs pull)", "s",
            "≤ 0.1×", "g5t.gfs", base="g5t.base", ratio=div, check=lambda r: r.ratio <= 0.1)
        row("G6.seq", "registry bytes, sequential read (vs bytes the kernel asked)", "bytes",
            "≤ 1.02×", "g6s.gfs", base="g6s.base", ratio=div, check=lambda r: r.ratio <= 1.02)
        rand_note = ""
        if s.get("g6r.time"):
            rand_note = (f"fio random reads: {statistics.median(s['g6r.base']) / MiB:.1f} MiB "
                         f"in {statistics.median(s['g6r.time']):.2f} s (capped at {RAND_RUNTIME} s)")
        row("G6.rand", f"registry bytes, fio 4 KiB random reads ({self.sizes.rand_io // MiB} MiB "
            "worth) (vs fio io bytes)", "bytes", "≤ 2×", "g6r.gfs", base="g6r.base", ratio=div,
            check=lambda r: r.ratio <= 2, note=rand_note)
        row("G7", f"time to first byte, p50 of {self.sizes.ttfb_files} uncached files "
            "(vs Range 0-0 GET, warm)", "ms", "≤ 2× + 5 ms", "g7.gfs", base="g7.base", ratio=div,
            check=lambda r: r.galleryfs <= 2 * r.baseline + 5)
        row("G8.cold", f"ls -R of the {self.sizes.zoo_models}-model gallery, cold (vs sequential "
            "httpx requests)", "s", "≤ 1.0×", "g8c.gfs", base="g8c.base", ratio=div,
            check=lambda r: r.ratio <= 1.0)
        row("G8.warm", "ls -R again, warm within the TTL", "ms", "≤ 50 ms", "g8w.gfs",
            check=lambda r: r.galleryfs <= 50)
        cap = max(s.get("g9.cap", [DEFAULT_READAHEAD_CAP]))
        row("G9", "peak RSS (VmHWM) of the daemon during G1, max of repeats", "bytes",
            f"≤ 64 MiB + {cap // MiB} MiB", "g9.gfs", gfs_agg=max,
            check=lambda r: r.galleryfs <= 64 * MiB + cap)
        single = s.get("g1.gfs", [])
        if single and "G1" not in self.failed:
            s["g10.base"] = single[: len(s.get("g10.gfs", []))]
        row("G10", f"two readers of two {big} files at once, aggregate (vs G1 single reader)",
            "MB/s", "≥ 1.0×", "g10.gfs", base="g10.base", ratio=div, check=lambda r: r.ratio >= 1.0)
        row("G11.push", f"galleryfs push of the {big} model (vs oras push)", "MB/s", "≥ 1.5×",
            "g11p.gfs", base="g11p.base", ratio=div, check=lambda r: r.ratio >= 1.5)
        row("G11.again", "the same push again (vs the first push)", "s", "≤ 0.05×", "g11r.gfs",
            base="g11r.base", ratio=div, check=lambda r: r.ratio <= 0.05)
        for ext in EXTENSIONS:
            ext.rows(self, row)
        return rows

    def store_note(self, key: str, seconds: list[float]) -> str:
        """How the disk cache was written for a read of `seconds` (medians): after it
        (write-behind), or during it (what a chunk's write cost)."""
        s = self.samples
        if s.get(f"{key}.fill_chunks"):
            med = {k: statistics.median(s[f"{key}.{k}"])
                   for k in ("fill_chunks", "fill_dropped", "fill_s", "flush_s")}
            return (f"the disk cache was written after the read, from the page cache: "
                    f"{med['fill_chunks']:.0f} chunks in {med['fill_s']:.1f} s, "
                    f"{med['fill_dropped']:.0f} not cached (dropped from the page cache "
                    f"already, not fetched again); the unmount waited {med['flush_s']:.1f} s "
                    "for it")
        if not s.get(f"{key}.store_ms") or not seconds:
            return ""
        per_chunk = statistics.median(s[f"{key}.store_ms"])
        return (f"with the cache on, {per_chunk:.0f} ms per chunk in its write path (write and "
                f"hash) during the {statistics.median(seconds):.1f} s read")

    def report(self, rows: list[Row], elapsed: float) -> str:
        head = ["id", "metric", "galleryfs", "baseline", "ratio", "goal", "met"]
        table = []
        for r in rows:
            if r.na:
                table.append([r.id, r.metric, f"n/a ({r.na})", "", "", r.goal, "n/a"])
            else:
                met = "yes" if r.met else "NO"
                table.append([r.id, r.metric, fmt(r.galleryfs, r.unit), fmt(r.baseline, r.unit),
                              fmt_ratio(r.ratio), r.goal, met])
        widths = [max(len(str(x[c])) for x in [head, *table]) for c in range(len(head))]
        lines = []
        sz = self.sizes
        lines.append(f"galleryfs bench ({'quick' if self.args.quick else 'full'}): file "
                     f"{sz.big // MiB} MiB ({sz.big_tensors} tensors), multi-file "
                     f"{sz.multi_files}×{sz.multi_file_size // MiB} MiB, {sz.zoo_models} models × "
                     f"{len(sz.zoo_tags)} tags; median of {self.repeat} repeat(s); {elapsed:.0f}s")
        if self.cache.works:
            lines.append("cold = fresh mount, empty --cache-dir, page cache dropped (drop_caches)")
        else:
            lines.append(f"WARNING: {self.cache.reason}: 'cold' rows ran with a warm page cache")
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for x in table:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(x, widths, strict=True)).rstrip())
        for r in rows:
            if r.note:
                lines.append(f"note: {r.id}: {r.note}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def to_json(self, rows: list[Row], elapsed: float) -> dict[str, Any]:
        return {
            "version": 1,
            "quick": bool(self.args.quick),
            "repeat": self.repeat,
            "elapsed_s": round(elapsed, 1),
            "page_cache_dropped": self.cache.works,
            "page_cache_note": self.cache.reason,
            "sizes": {"file": self.sizes.big, "tensor": self.sizes.tensor,
                      "multi_files": self.sizes.multi_files,
                      "multi_file_size": self.sizes.multi_file_size,
                      "models": self.sizes.zoo_models, "tags": len(self.sizes.zoo_tags),
                      "ttfb_files": self.sizes.ttfb_files, "random_io": self.sizes.rand_io},
            "goals": {g: [r.id for r in rows if r.goal_id == g] for g in GOALS},
            "rows": [r.__dict__ for r in rows],
            "notes": self.notes,
        }


def goal_list(text: str) -> list[str]:
    goals = [g.strip().upper() for g in text.split(",") if g.strip()]
    unknown = [g for g in goals if g not in GOALS]
    if not goals or unknown:
        raise argparse.ArgumentTypeError(f"expected goals among {', '.join(GOALS)}, got {text!r}")
    return goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke test)")
    p.add_argument("--repeat", type=int, metavar="N", help="repeats per measurement (default 3; quick 1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workdir", metavar="DIR", help="data and run directory (default .bench/)")
    p.add_argument("--chunk-size", metavar="SIZE", help="pass --chunk-size to galleryfs mount")
    p.add_argument("--keep", action="store_true", help="keep the run directory (mounts, caches)")
    p.add_argument("--fresh-registry", action="store_true",
                   help="empty the registry storage kept under the work directory first")
    p.add_argument("--only", metavar="G1,G10", type=goal_list,
                   help="run only the measurements these goals need (rows of others: not measured)")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    start = time.monotonic()
    bench = Bench(args)
    if not bench.cache.works:
        log(f"WARNING: {bench.cache.reason}; cold figures will be warm")
    try:
        bench.setup()
        bench.setup_extensions()
        bench.measure()
    except KeyboardInterrupt:
        log("interrupted: unmounting and stopping the registry")
        return 130
    finally:
        bench.close()
    elapsed = time.monotonic() - start
    rows = bench.rows()
    print(bench.report(rows, elapsed), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.to_json(rows, elapsed), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    # Run as `python -m scripts.bench`, this file is __main__; the scale modules import
    # scripts.bench, so run main from that one module rather than from a second copy.
    from scripts.bench import main as _main

    raise SystemExit(_main())
