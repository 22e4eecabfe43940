"""Write-behind of the disk cache (writeback.py) against a real registry, with a stand-in
for the kernel's page cache (the mount tests use the real one)."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from galleryfs.mount.diskcache import DiskCache
from galleryfs.mount.reader import BlobRef, ChunkReader
from galleryfs.mount.writeback import PageCacheFill
from tests.test_chunks import CHUNK, MAX_WRITE, Counting, PageCache, _client, push_blob, tabled

pytestmark = pytest.mark.trio

INODE = 7
REPO = "fill/blob"


@pytest.fixture
def blob(registry) -> tuple[BlobRef, bytes]:  # noqa: ANN001 - harness fixture
    data = os.urandom(10 * CHUNK + 1234)
    return tabled(REPO, push_blob(registry.url, REPO, data), data), data


async def _setup(nursery: trio.Nursery, client, tmp_path, quiet: float,  # noqa: ANN001
                 **reader_options: int | None
                 ) -> tuple[ChunkReader, PageCacheFill, PageCache, Counting, DiskCache]:
    fetch = Counting(client)
    disk = DiskCache(tmp_path, 1 << 30, CHUNK)
    # Memory for one chunk unless asked otherwise (None: the reader's default): the fill
    # has to ask the page cache for the others.
    reader_options.setdefault("memory_bytes", CHUNK)
    options = {k: v for k, v in reader_options.items() if v is not None}
    reader = ChunkReader(fetch, chunk_size=CHUNK, disk=disk, **options)
    kernel = PageCache(nursery)
    fill = PageCacheFill(reader, kernel.retrieve, quiet=quiet)
    kernel.fill = fill
    reader.defer = fill.owe
    await nursery.start(fill.run)
    return reader, fill, kernel, fetch, disk


async def _read(reader: ChunkReader, fill: PageCacheFill, kernel: PageCache, ref: BlobRef,
                data: bytes, holes: list[tuple[int, int]] | None = None) -> None:
    """Read the whole blob as a mount would, leaving its bytes (less `holes`) in the
    kernel's page cache.

    Chunk by chunk, in order, as the kernel asks: memory (one chunk's worth) then ends up
    holding the last chunk, whatever the fetch timings. One read of the whole blob would
    fetch every chunk at once, and memory would keep whichever arrived last, which the
    fill would take from there rather than from the page cache or the registry.
    """
    fill.opened(ref, INODE)
    kernel.files[INODE] = data
    kernel.holes = holes or []
    for offset in range(0, ref.size, CHUNK):
        assert await reader.read(ref, offset, CHUNK) == data[offset:offset + CHUNK]
    assert reader.held(ref, reader.nchunks(ref) - 1) is not None


def _complete(tmp_path, digest: str) -> bool:  # noqa: ANN001
    return (tmp_path / "blobs" / "sha256" / digest.split(":")[1]).exists()


async def test_owed_chunks_wait_for_quiet_or_flush_then_come_from_the_page_cache(
        registry, blob, tmp_path) -> None:
    ref, data = blob
    async with _client(registry) as client, trio.open_nursery() as nursery:
        reader, fill, kernel, fetch, disk = await _setup(nursery, client, tmp_path, 3600)
        await _read(reader, fill, kernel, ref, data)
        n = reader.nchunks(ref)
        # Reads still going on (no quiet yet): nothing is written during them.
        await trio.testing.wait_all_tasks_blocked()
        assert fill.owed == n and reader.snapshot()["stores"] == 0
        assert not disk.has_chunk(ref.digest, ref.size, 0)
        assert await fill.flush(30)
        nursery.cancel_scope.cancel()
    assert _complete(tmp_path, ref.digest)
    assert len(fetch.calls) == n  # every chunk fetched once, none again for the cache
    assert fill.stats.filled == n and fill.stats.dropped == 0 and fill.stats.missed == 0
    # All but the last chunk, which the memory cache held, came from the page cache, in
    # pieces.
    assert fill.stats.from_memory == 1 and kernel.served == ref.size - (ref.size % CHUNK)
    assert kernel.asked >= kernel.served // MAX_WRITE


@pytest.mark.parametrize("flushing", [False, True], ids=["quiet", "flush"])
async def test_a_chunk_the_page_cache_dropped_is_not_fetched_again(
        registry, blob, tmp_path, mock_clock, flushing: bool) -> None:
    ref, data = blob
    hole = [(3 * CHUNK + 5000, 3 * CHUNK + 6000)]
    async with _client(registry) as client, trio.open_nursery() as nursery:
        reader, fill, kernel, fetch, disk = await _setup(nursery, client, tmp_path, 0.05)
        # The clock stands still while the blob is read: the quiet the fill waits for
        # comes after the last read, not during a slow fetch.
        await _read(reader, fill, kernel, ref, data, hole)
        n = reader.nchunks(ref)
        if flushing:  # an unmount waiting: the same, without waiting for quiet
            assert await fill.flush(30)
            assert fill.flush_missed == 1
        else:
            mock_clock.jump(1)
            await fill.drained()
        # The registry was asked for each chunk once: the fill cost no second fetch.
        assert len(fetch.calls) == n
        assert fill.stats.dropped == 1 and fill.stats.missed == 0
        assert fill.stats.filled == n - 1 and fill.owed == 0
        assert not _complete(tmp_path, ref.digest)
        assert not disk.has_chunk(ref.digest, ref.size, 3)
        assert disk.has_chunk(ref.digest, ref.size, 4)
        # `warm` is how a cache is filled on purpose: it fetches what is missing only.
        warmed = await reader.warm(ref)
        assert (warmed.fetched, warmed.cached) == (1, n - 1)
        assert _complete(tmp_path, ref.digest)
        nursery.cancel_scope.cancel()
    assert [c for c in fetch.calls if c[0] == 3 * CHUNK] == [(3 * CHUNK, 4 * CHUNK)] * 2


async def test_quiet_starts_the_fill(registry, blob, tmp_path, mock_clock) -> None:
    ref, data = blob
    async with _client(registry) as client, trio.open_nursery() as nursery:
        reader, fill, kernel, fetch, disk = await _setup(nursery, client, tmp_path, 0.05)
        await _read(reader, fill, kernel, ref, data)
        # Not a moment too early: nothing written until the quiet has passed.
        mock_clock.jump(0.04)
        await trio.testing.wait_all_tasks_blocked()
        assert fill.owed == reader.nchunks(ref) and fill.stats.filled == 0
        mock_clock.jump(0.02)
        await fill.drained()
        assert fill.owed == 0 and _complete(tmp_path, ref.digest)
        nursery.cancel_scope.cancel()
    assert len(fetch.calls) == reader.nchunks(ref)


async def test_a_stream_drops_the_chunks_it_passed_while_they_are_owed(registry, blob,
                                                                      tmp_path) -> None:
    ref, data = blob
    async with _client(registry) as client, trio.open_nursery() as nursery:
        reader, fill, kernel, fetch, disk = await _setup(
            nursery, client, tmp_path, 3600, window_cap=2 * CHUNK, memory_bytes=None)
        fill.opened(ref, INODE)
        handle = reader.open(ref, nursery)
        out = bytearray()
        held = []
        for offset in range(0, ref.size, 16 << 10):
            out += await handle.read(offset, 16 << 10)
            held.append(reader.memory.bytes)
        handle.close()
        assert bytes(out) == data
        # Not on disk yet, but left to the kernel's page cache: memory holds the window
        # ahead and the chunk being read, not the whole file.
        assert max(held) <= 4 * CHUNK and fill.owed == reader.nchunks(ref)
        kernel.files[INODE] = data
        assert await fill.flush(30)
        nursery.cancel_scope.cancel()
    assert _complete(tmp_path, ref.digest) and len(fetch.calls) == reader.nchunks(ref)


async def test_a_stream_keeps_a_chunk_until_the_kernel_has_all_of_it(registry, blob,
                                                                    tmp_path) -> None:
    """The kernel's read-ahead requests are answered out of order: the first piece of a
    chunk can be returned before the last piece of the one before. That chunk stays in
    memory until its last piece is returned; dropped at the first read past it, it was
    fetched again for that piece (a cold `cat` fetched 1.17× the file's bytes)."""
    ref, data = blob
    async with _client(registry) as client, trio.open_nursery() as nursery:
        reader, fill, kernel, fetch, disk = await _setup(
            nursery, client, tmp_path, 3600, window_cap=2 * CHUNK, memory_bytes=None)
        fill.opened(ref, INODE)
        handle = reader.open(ref, nursery)
        piece = CHUNK // 8
        offsets = list(range(0, ref.size, piece))
        for k in range(1, reader.nchunks(ref)):  # chunk k's first piece before k-1's last
            i = offsets.index(k * CHUNK)
            offsets[i - 1], offsets[i] = offsets[i], offsets[i - 1]
        held = []
        for offset in offsets:
            assert await handle.read(offset, piece) == data[offset:offset + piece]
            held.append(reader.memory.bytes)
        handle.close()
        kernel.files[INODE] = data
        assert await fill.flush(30)
        nursery.cancel_scope.cancel()
    # Each chunk fetched once, and memory still bounded by the window, not the file.
    assert sorted(fetch.calls) == sorted(set(fetch.calls))
    assert len(fetch.calls) == reader.nchunks(ref)
    assert max(held) <= 4 * CHUNK
    assert _complete(tmp_path, ref.digest) and fill.stats.dropped == 0


async def test_read_ahead_skips_a_chunk_returned_whole(registry, blob, tmp_path) -> None:
    """An mmap loader's faults read around, back and forth: a read that ends inside a
    chunk the kernel already holds whole (and memory dropped) must not fetch it again
    as read-ahead (a safetensors load fetched 1.81× the file's bytes)."""
    ref, data = blob
    async with _client(registry) as client, trio.open_nursery() as nursery:
        fetch = Counting(client)
        disk = DiskCache(tmp_path, 1 << 30, CHUNK)
        reader = ChunkReader(fetch, chunk_size=CHUNK, window_cap=2 * CHUNK, disk=disk)
        fill = PageCacheFill(reader, PageCache(nursery).retrieve, quiet=3600)
        reader.defer = fill.owe
        handle = reader.open(ref, nursery)
        p = CHUNK // 4
        # As a fault-around pattern seen through a mount: the last of these returns the
        # rest of chunk 0, two chunks behind the furthest read (so it leaves memory),
        # and continues the stream that started a piece before it.
        for offset, size in ((0, p), (3 * p, 6 * p), (p, p), (2 * p, p)):
            assert await handle.read(offset, size) == data[offset:offset + size]
        assert not reader.in_memory(ref, 0)
        await trio.testing.wait_all_tasks_blocked()
        handle.close()
        nursery.cancel_scope.cancel()
    assert fetch.calls.count((0, CHUNK)) == 1, fetch.calls
