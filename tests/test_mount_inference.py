"""A real inference library loads the model from the mount and computes what it does from disk."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_harness import Registry

pytestmark = pytest.mark.mount


def _fuse_available() -> bool:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def _galleryfs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "galleryfs", *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def mounted_model(registry: Registry, model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    if not _fuse_available():
        pytest.skip("/dev/fuse cannot be opened")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    pushed = _galleryfs("push", str(model_dir), f"{registry.host}/team-a/minilm:v1", "--plain-http",
                        "--quiet", env=env)
    assert pushed.returncode == 0, pushed.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = _galleryfs("mount", registry.host, str(mnt), "--plain-http", "--cache-dir",
                        str(tmp_path / "fscache"), env=env)
    assert result.returncode == 0, result.stderr
    try:
        assert os.path.ismount(mnt)
        yield mnt / "team-a" / "minilm" / "v1"
    finally:
        done = _galleryfs("unmount", str(mnt), env=env)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mnt)


def test_sentence_transformers_from_mount_matches_disk(mounted_model: Path, model_dir: Path) -> None:
    numpy = pytest.importorskip("numpy")
    pytest.importorskip("sentence_transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    sentences = ["galleryfs streams model weights lazily.", "A cat sat on the mat."]
    from_disk = SentenceTransformer(str(model_dir), device="cpu").encode(sentences)
    model = SentenceTransformer(str(mounted_model), device="cpu")
    from_mount = model.encode(sentences)
    # The loaded weights may still map the mounted file: let go so the mount can unmount.
    del model
    gc.collect()
    assert from_disk.shape == (2, 384)
    numpy.testing.assert_allclose(from_mount, from_disk, rtol=0, atol=1e-6)
