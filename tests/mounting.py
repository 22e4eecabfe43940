"""Mounting through the real CLI in tests: always unmounted, also when the test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def fuse_available() -> bool:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return shutil.which("fusermount3") is not None


def galleryfs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "galleryfs", *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


def isolated_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "XDG_CONFIG_HOME": str(tmp_path / "config")}


@contextlib.contextmanager
def mounted(source: str, mnt: Path, env: dict[str, str], *options: str) -> Iterator[Path]:
    if not fuse_available():
        pytest.skip("/dev/fuse cannot be opened")
    mnt.mkdir(exist_ok=True)
    result = galleryfs("mount", source, str(mnt), *options, env=env)
    assert result.returncode == 0, result.stderr
    try:
        assert os.path.ismount(mnt)
        yield mnt
    finally:
        done = galleryfs("unmount", str(mnt), env=env)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mnt)
