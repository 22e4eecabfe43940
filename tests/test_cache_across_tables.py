"""One blob, several chunk tables: the disk cache serves a file to every revision that holds
it, whichever table each has (the table's piece size depends on the revision's size), and
a second pass through one open file reads ahead again. Found by a hostile review of issue
15's read path; each test failed on the code before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from galleryfs.modelpack import ChunkTable
from galleryfs.mount.diskcache import DiskCache
from galleryfs.mount.reader import BlobRef, ChunkReader
from tests.registry_harness import Registry
from tests.test_chunks import Counting, _client, push_blob

PIECE = 64 << 10
CHUNK = 1 << 20
REPO = "review/blob"


def _fetched(fetch: Counting) -> int:
    return sum(end - start for start, end in fetch.calls)


@pytest.mark.trio
@pytest.mark.parametrize("second", ["coarse", "none"])
async def test_a_complete_blob_cached_by_a_fine_table_serves_other_tables(
        registry: Registry, tmp_path: Path, second: str) -> None:
    """The same file in two revisions whose tables differ (table_chunk_size depends on
    the revision's total size): once revision A (64 KiB table) filled the cache, a reader
    of revision B (1 MiB table, or no table) should read it from disk."""
    data = os.urandom(4 * CHUNK + CHUNK // 2)
    digest = push_blob(registry.url, REPO, data)
    fine = BlobRef(REPO, digest, len(data), ChunkTable.of_bytes(data, PIECE))
    other = BlobRef(REPO, digest, len(data),
                    ChunkTable.of_bytes(data, CHUNK) if second == "coarse" else None)
    async with _client(registry) as client:
        a = ChunkReader(Counting(client), chunk_size=CHUNK,
                        disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        warmed = await a.warm(fine)
        assert warmed.fetched == 5
        # A second mount over the same cache directory (or the same mount, revision B).
        fetch = Counting(client)
        b = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        assert await b.read(other, 0, len(data)) == data
        first = _fetched(fetch)
        again = await b.warm(other)
        assert again.fetched == 0, again
        # A remount: a fresh reader over the same cache (memory does not hide the disk).
        fetch2 = Counting(client)
        c = ChunkReader(fetch2, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        assert await c.read(other, 0, len(data)) == data
        second_read = _fetched(fetch2)
        assert first == 0 and second_read == 0


@pytest.mark.trio
async def test_a_second_pass_through_one_open_file_still_reads_ahead(
        registry: Registry) -> None:
    """A loader that keeps a file open and reads it again (an epoch, a re-read after the
    page cache dropped it) should get read-ahead on the second pass too."""
    size = 16 * CHUNK
    data = os.urandom(size)
    digest = push_blob(registry.url, REPO, data)
    ref = BlobRef(REPO, digest, size, ChunkTable.of_bytes(data, CHUNK))
    async with _client(registry) as client:
        reader = ChunkReader(Counting(client), chunk_size=CHUNK, window_cap=4 * CHUNK,
                             memory_bytes=6 * CHUNK)
        counts = []
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            for _ in range(2):
                before = reader.prefetcher.prefetches
                misses = reader.stats.memory_misses
                for offset in range(0, size, 128 << 10):
                    assert bytes(await handle.read(offset, 128 << 10)) == \
                        data[offset:offset + (128 << 10)]
                    await trio.testing.wait_all_tasks_blocked()
                counts.append((reader.prefetcher.prefetches - before,
                               reader.stats.memory_misses - misses))
            handle.close()
        assert counts[1][0] > 0, counts


@pytest.mark.mount
def test_mount_two_revisions_of_one_file_with_different_tables_share_the_cache(
        registry: Registry, tmp_path: Path) -> None:
    """Through a real mount: revision v1 (64 KiB table) read and warmed, then v2 (the same
    file, 1 MiB table): v2's reads should come from the disk cache."""
    import hashlib
    import json

    from tests.test_integrity import push_revision
    from tests.test_mount import start_foreground, stats, unmount, wait_for_mount

    data = os.urandom(8 * CHUNK + 4321)
    push_revision(registry, "review/two", "v1", data, table=ChunkTable.of_bytes(data, PIECE))
    push_revision(registry, "review/two", "v2", data, table=ChunkTable.of_bytes(data, CHUNK))
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "log"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, cache, log, "--chunk-size", "1M")
    try:
        wait_for_mount(proc, mnt, log)
        v1 = mnt / "review" / "two" / "v1" / "weights.bin"
        v2 = mnt / "review" / "two" / "v2" / "weights.bin"
        os.stat(v1), os.stat(v2)
        assert v1.read_bytes() == data
        json.loads(os.getxattr(v1, "user.galleryfs.warm"))  # fills the disk cache with v1
        assert (cache / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()).exists()
        deltas = []
        for _ in range(2):
            before = stats(mnt)["registry_bytes"]
            with open(v2, "rb") as f:
                assert f.read() == data
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            deltas.append(stats(mnt)["registry_bytes"] - before)
        warm2 = json.loads(os.getxattr(v2, "user.galleryfs.warm"))
        assert warm2.get("fetched") == 0, warm2
        assert deltas == [0, 0]
    finally:
        unmount(mnt, proc)
