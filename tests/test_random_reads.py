"""Reads outside a stream fetch the table pieces they touch, not whole chunks (issue 15,
P3): against a real registry, and one tensor by `get_tensor` through a real mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from galleryfs.errors import DigestMismatch
from galleryfs.gallery import pushing
from galleryfs.modelpack import ChunkTable
from galleryfs.mount.reader import BlobRef, ChunkReader
from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry
from tests.test_chunks import Counting, _client, push_blob

PIECE = 64 << 10  # the table's chunk
CHUNK = 1 << 20  # the mount's
REPO = "random/blob"
SLACK = 2 << 20  # P3: a tensor costs at most its bytes and this


@pytest.fixture
def fine(registry: Registry) -> tuple[BlobRef, bytes]:
    """A blob of 3.5 chunks whose table is finer than the mount's chunk."""
    data = os.urandom(3 * CHUNK + CHUNK // 2)
    digest = push_blob(registry.url, REPO, data)
    return BlobRef(REPO, digest, len(data), ChunkTable.of_bytes(data, PIECE)), data


@pytest.mark.trio
async def test_random_reads_fetch_only_the_pieces_they_touch(registry, fine) -> None:  # noqa: ANN001
    ref, data = fine
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK)
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            # A read inside one piece, one across two, the same piece again, and one at
            # offset 0 (a safetensors header: not taken as the start of a stream here).
            for offset, size in ((2 * CHUNK + 5000, 4096), (PIECE - 100, 200),
                                 (2 * CHUNK + 9000, 100), (0, 8)):
                got = await handle.read(offset, size)
                assert bytes(got) == data[offset:offset + size]
                assert handle.readahead.window == 0
            handle.close()
        base = 2 * CHUNK
        assert fetch.calls == [(base, base + PIECE), (0, 2 * PIECE)]
        stats = reader.snapshot()
        assert stats["verified_pieces"] == 3
        assert stats["verified_chunks"] == stats["prefetches"] == stats["memory_bytes"] == 0


@pytest.mark.trio
async def test_wrong_piece_bytes_are_never_served(registry, fine) -> None:  # noqa: ANN001
    ref, data = fine
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK)
        fetch.corrupt = True
        with pytest.raises(DigestMismatch):
            await reader.read_random(ref, CHUNK + 10, CHUNK + 20)
        assert reader.snapshot()["verify_failures"] == 1
        assert reader.pieces.bytes == 0  # nothing of the wrong bytes is kept
        fetch.corrupt = False
        assert bytes(await reader.read_random(ref, CHUNK + 10, CHUNK + 20)) == \
            data[CHUNK + 10:CHUNK + 20]


@pytest.mark.trio
async def test_a_stream_starts_after_half_a_chunk_and_fetches_no_byte_twice(
        registry, fine) -> None:  # noqa: ANN001
    ref, data = fine
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, window_cap=2 * CHUNK)
        windows = []
        out = bytearray()
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            for offset in range(0, ref.size, 128 << 10):
                out += await handle.read(offset, 128 << 10)
                windows.append(handle.readahead.window)
            handle.close()
        assert bytes(out) == data
        # Reads in pieces until they have covered half a chunk, then a stream.
        assert windows[:3] == [0, 0, 0] and windows[3] == CHUNK
        assert reader.snapshot()["prefetches"] > 0
        # The chunk the stream started in was made of the pieces already read and the
        # rest of it: every byte came from the registry once.
        assert sum(end - start for start, end in fetch.calls) == ref.size
        assert reader.pieces.bytes == 0


def test_tables_are_as_fine_as_their_budget_allows() -> None:
    gib = 1 << 30
    assert pushing.table_chunk_size([90_868_376, 1000]) == 64 << 10  # MiniLM: 60 KB
    assert pushing.table_chunk_size([gib]) == 64 << 10
    assert pushing.table_chunk_size([4 * gib]) == 256 << 10
    assert pushing.table_chunk_size([14 * gib]) == 1 << 20
    for sizes in ([gib], [4 * gib], [14 * gib], [30 * gib]):
        chunk = pushing.table_chunk_size(sizes)
        if chunk < pushing.TABLE_CHUNK:
            assert sum(pushing.table_annotation_bytes(s, chunk) for s in sizes) \
                <= pushing.FINE_BUDGET


@pytest.mark.mount
def test_one_tensor_by_get_tensor_costs_the_tensor_plus_2_mib(
        registry: Registry, model_dir: Path, tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    numpy = pytest.importorskip("numpy")
    env = isolated_env(tmp_path)
    pushed = galleryfs("push", str(model_dir), f"{registry.host}/g/minilm:v1", "--plain-http",
                       "--quiet", env=env)
    assert pushed.returncode == 0, pushed.stderr
    name = "encoder.layer.0.attention.output.dense.weight"  # 384×384 float32, mid-file
    with safetensors.safe_open(str(model_dir / "model.safetensors"), framework="numpy") as f:
        want = f.get_tensor(name)
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                 str(tmp_path / "fscache")) as mnt:
        path = mnt / "g" / "minilm" / "v1" / "model.safetensors"
        path.stat()  # metadata first: registry bytes count file bytes only
        before = json.loads(os.getxattr(mnt, "user.galleryfs.stats"))
        with safetensors.safe_open(str(path), framework="numpy") as f:
            got = f.get_tensor(name)
        # What the write-behind owes is written (and fetched, if it must be) now.
        assert json.loads(os.getxattr(mnt, "user.galleryfs.flush"))["done"] is True
        after = json.loads(os.getxattr(mnt, "user.galleryfs.stats"))
    numpy.testing.assert_array_equal(got, want)
    assert want.nbytes == 384 * 384 * 4
    fetched = after["registry_bytes"] - before["registry_bytes"]
    assert 0 < fetched <= want.nbytes + SLACK, fetched
    assert after["verified_pieces"] > 0 and after["verify_failures"] == 0


@pytest.mark.trio
async def test_random_reads_all_over_a_file_cost_at_most_the_file(registry: Registry,
                                                                 tmp_path: Path) -> None:
    """4 KiB random reads all over a file with a 64 KiB table, the disk cache on (fio's
    random_read): a chunk half of whose pieces were fetched is completed and kept on disk,
    so registry bytes stay about the file's size (pieces alone live in an 8 MiB memory:
    2.2x and nothing on disk without it), and a remount reads them from disk."""
    import random

    from galleryfs.mount.diskcache import DiskCache

    size = 32 * CHUNK
    data = os.urandom(size)
    digest = push_blob(registry.url, REPO, data)
    ref = BlobRef(REPO, digest, size, ChunkTable.of_bytes(data, PIECE))
    rng = random.Random(1)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(1500)]
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            for off in offsets:
                assert bytes(await handle.read(off, 4096)) == data[off:off + 4096]
            handle.close()
        # Within a tenth of the file: a piece the small memory evicted before its chunk
        # was completed is fetched again with the rest of the chunk.
        assert sum(end - start for start, end in fetch.calls) <= 1.1 * size
        again = Counting(client)
        remounted = ChunkReader(again, chunk_size=CHUNK,
                                disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with trio.open_nursery() as nursery:
            handle = remounted.open(ref, nursery)
            for off in offsets[:200]:
                assert bytes(await handle.read(off, 4096)) == data[off:off + 4096]
            handle.close()
        assert not again.calls
