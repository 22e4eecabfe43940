"""Other tools read a galleryfs revision as plain files, chunk tables and all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from galleryfs import digest as digests
from galleryfs import gallery, modelpack
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.registry_harness import Registry
from tests.schema import pushed, validate_every_config


@pytest.fixture(autouse=True)
def _configs_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    validate_every_config(monkeypatch)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_oras_pulls_exactly_the_files_of_a_tabled_revision(registry: Registry, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import oras.client

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "m"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}"
                                            + os.urandom(9 << 20))
    (src / "config.json").write_text('{"architectures": ["BertModel"]}')
    (src / "1_Pooling" / "config.json").write_text("{}")

    async def push() -> gallery.PushResult:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            return await gallery.push(client, src, parse(f"{registry.host}/g/m:v1"))

    result = trio.run(push)
    manifest, _ = pushed(registry.host, "g/m", "v1")
    weights = next(layer for layer in manifest["layers"]
                   if layer["annotations"][modelpack.ANNOTATION_FILEPATH] == "model.safetensors")
    assert modelpack.ANNOTATION_CHUNK_SHA256 in weights["annotations"]

    out = tmp_path / "out"
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    client.pull(target=f"{registry.host}/g/m@{result.digest}", outdir=str(out))
    # Exactly the model's files: no table, config or other extra file.
    assert _tree(out) == _tree(src)


def test_a_tabled_manifest_parses_with_each_big_file_its_table(registry: Registry, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "m"
    src.mkdir()
    # Files larger than one table chunk (64 KiB for sizes like these) get a table.
    sizes = {"a.bin": (4 << 20) + 1, "b.bin": 10 << 20, "c.bin": 4 << 20, "d.txt": 5,
             "e.bin": 64 << 10}
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))

    async def read() -> modelpack.Revision:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            await gallery.push(client, src, parse(f"{registry.host}/g/m:v1"))
            return await gallery.resolve(client, parse(f"{registry.host}/g/m:v1"))

    revision = trio.run(read)
    assert revision.skipped == ()
    tables = {f.path: f.table for f in revision.files}
    assert tables["d.txt"] is None and tables["e.bin"] is None
    for name in ("a.bin", "b.bin", "c.bin"):
        table = tables[name]
        assert table is not None and table.fits(sizes[name])
        data = (src / name).read_bytes()
        for i in range(len(table)):
            chunk = data[i * table.chunk_size:(i + 1) * table.chunk_size]
            assert table.expected(i) == hashlib.sha256(chunk).digest()
    assert {tables[n].chunk_size for n in ("a.bin", "b.bin", "c.bin")} == {64 << 10}  # type: ignore[union-attr]
    assert len(tables["a.bin"]) == 65 and len(tables["b.bin"]) == 160  # type: ignore[arg-type]
    # The table is part of the manifest, so of the revision digest.
    assert revision.digest == digests.of_bytes(modelpack.dumps(revision.manifest))
