"""`galleryfs warm`: a mount's disk cache filled ahead of need, verified, through a real
mount and a real registry."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry
from tests.test_integrity import blob_file, flip

MiB = 1 << 20


def push_model(registry: Registry, tmp_path: Path, env: dict[str, str], ref: str,
               files: dict[str, bytes]) -> None:
    src = tmp_path / ref.replace("/", "_").replace(":", "_")
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    r = galleryfs("push", str(src), f"{registry.host}/{ref}", "--plain-http", env=env)
    assert r.returncode == 0, r.stderr


def stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.galleryfs.stats"))


def test_warm_fills_the_disk_cache_once_and_a_remount_reads_without_the_network(
        registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    weights = os.urandom(9 * MiB + 5)  # three 4 MiB chunks, with a chunk table
    push_model(registry, tmp_path, env, "g/m:v1", {"w.bin": weights, "sub/c.json": b"{}"})
    options = ("--plain-http", "--cache-dir", str(tmp_path / "cache"))
    with mounted(registry.host, tmp_path / "mnt", env, *options) as mnt:
        before = stats(mnt)["registry_bytes"]
        # The tag is a symlink: named, it is followed to its revision.
        r = galleryfs("warm", str(mnt / "g" / "m" / "v1"), "--json", env=env)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary == {"files": 2, "bytes": len(weights) + 2,
                           "fetchedBytes": len(weights) + 2, "cachedChunks": 0, "failed": []}
        fetched = stats(mnt)["registry_bytes"] - before
        assert len(weights) <= fetched <= len(weights) * 1.02  # each byte once
        again = galleryfs("warm", str(mnt / "g"), env=env)
        assert again.returncode == 0, again.stderr
        assert "0 B fetched from the registry, 4 chunks already cached" in again.stdout
    with mounted(registry.host, tmp_path / "mnt", env, *options) as mnt:
        before = stats(mnt)["registry_bytes"]
        data = (mnt / "g" / "m" / "v1" / "w.bin").read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(weights).digest()
        assert stats(mnt)["registry_bytes"] - before < 64 << 10  # listings only, no blob


def test_warm_verifies_and_says_what_failed(registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    bad = os.urandom(6 * MiB)
    good = os.urandom(5 * MiB)
    push_model(registry, tmp_path, env, "g/bad:v1", {"w.bin": bad})
    push_model(registry, tmp_path, env, "g/good:v1", {"w.bin": good})
    flip(blob_file(registry, bad), (5 * MiB,))  # in the second chunk
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                 str(tmp_path / "cache")) as mnt:
        r = galleryfs("warm", str(mnt / "g"), "--json", env=env)
        assert r.returncode == 1
        summary = json.loads(r.stdout)
        assert summary["files"] == 1 and summary["bytes"] == len(good)
        assert len(summary["failed"]) == 1 and "/g/bad/" in summary["failed"][0]
        assert "Input/output error" in summary["failed"][0]
        assert stats(mnt)["verify_failures"] >= 1
        assert "galleryfs: error: " in r.stderr and "Traceback" not in r.stderr


def test_warm_refuses_what_it_cannot_do(registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    push_model(registry, tmp_path, env, "g/m:v1", {"w.bin": b"x" * 1000})
    r = galleryfs("warm", str(tmp_path), env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith("is not in a galleryfs mount")
    r = galleryfs("warm", str(tmp_path / "nothing"), env=env)
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-size", "0") as mnt:
        r = galleryfs("warm", str(mnt / "g"), env=env)
        assert r.returncode == 1 and "nothing on disk (--cache-size 0)" in r.stderr
        assert "Traceback" not in r.stderr


def test_warm_refuses_more_than_the_disk_cache_holds(registry: Registry, tmp_path: Path
                                                     ) -> None:
    # 14 MiB into a 6 MiB cache: the last chunks would evict the first, yet "warmed".
    env = isolated_env(tmp_path)
    push_model(registry, tmp_path, env, "g/m:v1",
               {"w.bin": os.urandom(9 * MiB + 5), "x.bin": os.urandom(5 * MiB)})
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                 str(tmp_path / "cache"), "--cache-size", "6M") as mnt:
        before = stats(mnt)["registry_bytes"]
        r = galleryfs("warm", str(mnt / "g" / "m" / "v1"), env=env)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "disk cache" in r.stderr and "--cache-size" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert stats(mnt)["registry_bytes"] - before < 64 << 10  # nothing fetched for it
        r = galleryfs("warm", str(mnt / "g" / "m" / "v1" / "x.bin"), env=env)
        assert r.returncode == 0, r.stderr  # what fits is warmed


def test_warm_finds_a_mount_whose_path_has_a_backslash_or_tab(registry: Registry,
                                                              tmp_path: Path) -> None:
    # /proc/self/mounts writes them as \\134 and \\011, not only the space as \\040.
    env = isolated_env(tmp_path)
    push_model(registry, tmp_path, env, "g/m:v1", {"w.bin": b"x" * 1000})
    with mounted(registry.host, tmp_path / "m\\ount\tpoint x", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache")) as mnt:
        r = galleryfs("warm", str(mnt / "g" / "m" / "v1"), env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("warmed 1 files")
