"""A real inference library loads the model from the mount and computes what it does from disk."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry

pytestmark = pytest.mark.mount


@pytest.fixture
def mounted_model(registry: Registry, model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    env = isolated_env(tmp_path)
    pushed = galleryfs("push", str(model_dir), f"{registry.host}/team-a/minilm:v1", "--plain-http",
                       "--quiet", env=env)
    assert pushed.returncode == 0, pushed.stderr
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                 str(tmp_path / "fscache")) as mnt:
        yield mnt / "team-a" / "minilm" / "v1"


def test_sentence_transformers_from_mount_matches_disk(mounted_model: Path, model_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    numpy = pytest.importorskip("numpy")
    # Before the import: huggingface_hub reads it once, when it is first imported.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("sentence_transformers")
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
