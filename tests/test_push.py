"""Push details: a repeat push neither re-reads unchanged files nor re-sends blobs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import trio

from galleryfs import digest as digests
from galleryfs import gallery, modelpack
from galleryfs.gallery import pushing
from galleryfs.gallery.hashcache import HashCache
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.uploads import DirectUploads
from tests.registry_harness import Registry
from tests.schema import pushed, validate_every_config


def test_repeat_push_reuses_digests_and_sees_changes(registry: Registry, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(50_000))
    (src / "sub" / "b.json").write_text("{}")
    hashed: list[str] = []
    real = digests.of_file

    def counting(path: str | os.PathLike[str], size: int | None = None) -> str:
        hashed.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(digests, "of_file", counting)

    requests: list[int] = []

    async def push() -> gallery.PushResult:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            result = await gallery.push(client, src, parse(f"{registry.host}/g/m:v1"))
            requests.append(client.requests_sent)
            return result

    first = trio.run(push)
    assert sorted(hashed) == ["a.bin", "b.json"] and len(first.uploaded) == 2
    hashed.clear()
    again = trio.run(push)
    assert hashed == [] and again.digest == first.digest and again.uploaded == []
    # The tag already names this revision: one HEAD of the manifest, nothing else.
    assert requests[-1] == 1 and sorted(again.existing) == ["a.bin", "sub/b.json"]
    # Changed bytes change the file's metadata: it is hashed again and makes a new revision.
    (src / "a.bin").write_bytes(os.urandom(50_000))
    changed = trio.run(push)
    assert hashed == ["a.bin"] and changed.digest != first.digest and changed.uploaded == ["a.bin"]


# ---- chunk tables --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _configs_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    validate_every_config(monkeypatch)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed from now on, once per read of a whole file."""
    reads: list[str] = []
    whole, chunked = digests.of_file, digests.of_file_chunks

    def of_file(path: str | os.PathLike[str], size: int | None = None) -> str:
        reads.append(Path(path).name)
        return whole(path, size)

    def of_file_chunks(path: str | os.PathLike[str], size: int, chunk_size: int
                       ) -> tuple[str, bytes]:
        reads.append(Path(path).name)
        return chunked(path, size, chunk_size)

    monkeypatch.setattr(digests, "of_file", of_file)
    monkeypatch.setattr(digests, "of_file_chunks", of_file_chunks)
    return reads


def _push(registry: Registry, src: Path, tag: str = "v1") -> gallery.PushResult:
    async def run() -> gallery.PushResult:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            return await gallery.push(client, src, parse(f"{registry.host}/g/m:{tag}"))

    return trio.run(run)


def _check_tables(registry: Registry, src: Path, tag: str, chunk_size: int) -> dict[str, int]:
    """Reads the revision back (its config checked against the schema) and checks every
    table against the files' bytes; returns the number of chunks per tabled file."""
    manifest, _ = pushed(registry.host, "g/m", tag)
    body = modelpack.dumps(manifest)
    revision = modelpack.parse_manifest(digests.of_bytes(body), body)
    tabled: dict[str, int] = {}
    for f in revision.files:
        data = (src / f.path).read_bytes()
        if f.size <= chunk_size:
            assert f.table is None, f.path  # one chunk: the blob digest checks it
            continue
        assert f.table is not None and f.table.chunk_size == chunk_size, f.path
        assert len(f.table) == -(-len(data) // chunk_size)
        for i in range(len(f.table)):
            piece = data[i * chunk_size:(i + 1) * chunk_size]
            assert f.table.expected(i) == hashlib.sha256(piece).digest(), (f.path, i)
        tabled[f.path] = len(f.table)
    return tabled


def test_large_files_get_chunk_tables_from_one_read_each(registry: Registry, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "m"
    src.mkdir()
    mib = 1 << 20
    # Sent while hashed (>= 16 MiB), hashed alone, 4 MiB, small (one table chunk or less).
    (src / "big.bin").write_bytes(os.urandom(17 * mib + 3))
    (src / "mid.bin").write_bytes(os.urandom(5 * mib))
    (src / "one.bin").write_bytes(os.urandom(4 * mib))
    (src / "config.json").write_text("{}")
    sent_while_hashed: list[str] = []
    real = DirectUploads.upload_hashing

    async def upload_hashing(self: DirectUploads, repo: str, path: str, *args: object,
                             **kwargs: object) -> object:
        sent_while_hashed.append(Path(path).name)
        return await real(self, repo, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DirectUploads, "upload_hashing", upload_hashing)
    reads = _count_reads(monkeypatch)

    first = _push(registry, src)
    assert sent_while_hashed == ["big.bin"]
    assert sorted(reads) == ["big.bin", "config.json", "mid.bin", "one.bin"]  # once each
    # Tables as fine as their budget allows: 64 KiB pieces (a read outside a stream
    # fetches only those it touches).
    assert _check_tables(registry, src, "v1", 64 << 10) == {"big.bin": 273, "mid.bin": 80,
                                                           "one.bin": 64}

    # Unchanged: digests and tables come from the hash cache, not one file is read.
    reads.clear()
    again = _push(registry, src, "v2")
    assert reads == [] and again.digest == first.digest

    # Without the cache: every file is read again, and the same content gives the same
    # tables and so the same revision.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    fresh = _push(registry, src, "v3")
    assert sorted(reads) == ["big.bin", "config.json", "mid.bin", "one.bin"]
    assert fresh.digest == first.digest


def test_the_table_chunk_doubles_for_the_whole_revision(registry: Registry, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kib = 1 << 10
    monkeypatch.setattr(pushing, "TABLE_CHUNK", 64 * kib)
    monkeypatch.setattr(pushing, "TABLE_BUDGET", 600)
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1024 * kib))
    (src / "b.bin").write_bytes(os.urandom(600 * kib))
    (src / "c.bin").write_bytes(os.urandom(100 * kib))  # tabled at 64 KiB, not at 256 KiB
    sizes = [1024 * kib, 600 * kib, 100 * kib]
    # 64 KiB and 128 KiB chunks would take more than 600 bytes of annotations.
    assert sum(pushing.table_annotation_bytes(s, 128 * kib) for s in sizes) > 600
    assert pushing.table_chunk_size(sizes) == 256 * kib
    _push(registry, src)
    assert _check_tables(registry, src, "v1", 256 * kib) == {"a.bin": 4, "b.bin": 3}
    manifest, _ = pushed(registry.host, "g/m", "v1")
    used = sum(len(k) + len(v) for layer in manifest["layers"]
               for k, v in layer["annotations"].items() if k.startswith("io.galleryfs.chunks."))
    assert used == sum(pushing.table_annotation_bytes(s, 256 * kib) for s in sizes) <= 600

    # The same files in a revision that needs larger chunks: the remembered 256 KiB
    # tables do not serve, the tabled files are read again (once each).
    reads = _count_reads(monkeypatch)
    monkeypatch.setattr(pushing, "TABLE_BUDGET", 300)
    _push(registry, src, "v2")
    assert sorted(reads) == ["a.bin", "b.bin"]
    assert _check_tables(registry, src, "v2", 512 * kib) == {"a.bin": 2, "b.bin": 2}


def test_real_sizes_get_fine_tables_then_4_mib_chunks_until_the_budget_is_reached() -> None:
    gib = 1 << 30
    assert pushing.table_chunk_size([4 << 20, 1000]) == 64 << 10
    assert pushing.table_chunk_size([30 * gib]) == 2 << 20  # 0.63 MiB of tables
    assert pushing.table_chunk_size([60 * gib]) == 4 << 20  # 2 MiB pieces: 1.25 MiB, too many
    assert pushing.table_chunk_size([90 * gib]) == 4 << 20  # 0.94 MiB of tables
    assert pushing.table_chunk_size([160 * gib, 120 * gib]) == 4 << 20  # 2.9 MiB
    assert pushing.table_chunk_size([160 * gib, 140 * gib]) == 8 << 20
    assert pushing.table_chunk_size([1024 * gib]) == 16 << 20
    # Beyond any budget the chunk stops at the largest a table may have.
    assert pushing.table_chunk_size([1 << 50]) == modelpack.MAX_TABLE_CHUNK


def test_the_hash_cache_keeps_a_table_only_with_its_digest(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    data = os.urandom(300_000)
    f.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    table = modelpack.ChunkTable.of_bytes(data, 64 << 10)
    cache = HashCache(tmp_path / "digests.json")
    cache.put(f, digest, len(data), f.stat(), table)
    cache.save()
    cache = HashCache(tmp_path / "digests.json")
    assert cache.get(f) == (digest, len(data))
    assert cache.get_table(f, digest, 64 << 10) == table
    assert cache.get_table(f, digest, 128 << 10) is None  # kept by chunk size
    assert cache.get_table(f, "sha256:" + "0" * 64, 64 << 10) is None  # another digest's
    # A damaged entry is no table (the file is hashed again).
    raw = json.loads((tmp_path / "digests.json").read_text())
    for key, value in raw.items():
        if ":chunks:" in key:
            raw[key] = value[:-8] + "AAAAAAA="
    (tmp_path / "digests.json").write_text(json.dumps(raw))
    assert HashCache(tmp_path / "digests.json").get_table(f, digest, 64 << 10) is None
