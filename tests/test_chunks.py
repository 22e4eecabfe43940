"""The chunk reader and disk cache against a real registry (no mount)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from galleryfs.errors import DigestMismatch
from galleryfs.modelpack import ChunkTable
from galleryfs.mount.diskcache import DiskCache
from galleryfs.mount.reader import BlobRef, ChunkReader
from galleryfs.mount.writeback import PageCacheFill
from galleryfs.registry.client import ClientOptions, RegistryClient

pytestmark = pytest.mark.trio

CHUNK = 64 << 10
REPO = "chunks/blob"


def push_blob(url: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        sep = "&" if "?" in location else "?"
        r = http.put(f"{location}{sep}digest={digest}", content=data,
                     headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
    return digest


def tabled(repo: str, digest: str, data: bytes, table_chunk: int = CHUNK) -> BlobRef:
    """The blob as a revision with a chunk table describes it (galleryfs's own pushes)."""
    return BlobRef(repo, digest, len(data), ChunkTable.of_bytes(data, table_chunk))


@pytest.fixture
def blob(registry) -> tuple[BlobRef, bytes]:  # noqa: ANN001 - harness fixture
    data = os.urandom(10 * CHUNK + 1234)
    digest = push_blob(registry.url, REPO, data)
    return tabled(REPO, digest, data), data


class Counting:
    """The real client's read_range, counting the requests that reach the registry."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.calls: list[tuple[int, int]] = []
        self.corrupt = False

    async def __call__(self, repo: str, digest: str, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        data = await self.client.read_range(repo, digest, start, end)
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def _client(registry) -> RegistryClient:  # noqa: ANN001
    return RegistryClient(registry.host, ClientOptions(plain_http=True, timeout=10))


MAX_WRITE = 16 << 10  # the kernel answers a retrieve in pieces of at most this


class PageCache:
    """What the kernel does with FUSE_NOTIFY_RETRIEVE: answers later, from the bytes it
    holds, cut at its maximum write size and at the first page it does not hold."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.files: dict[int, bytes] = {}
        self.holes: list[tuple[int, int]] = []
        self.fill: PageCacheFill | None = None
        self.asked = 0
        self.served = 0

    def holds(self, ref: BlobRef, data: bytes) -> None:
        """A file of `ref` was read: its pages hold `data`."""
        assert self.fill is not None
        inode = 1000 + len(self.files)
        self.files[inode] = data
        self.fill.opened(ref, inode)

    def retrieve(self, inode: int, size: int, offset: int, cookie: int) -> None:
        if inode not in self.files:
            raise FileNotFoundError("no such inode")
        self.asked += 1
        end = min(offset + size, offset + MAX_WRITE, len(self.files[inode]))
        for lo, hi in self.holes:
            if lo < end and hi > offset:
                end = max(offset, lo // 4096 * 4096)
        assert self.fill is not None
        self.served += end - offset
        self.nursery.start_soon(self.fill.retrieve_reply, cookie, inode, offset,
                                self.files[inode][offset:end])

    async def flush(self) -> None:
        """What `galleryfs unmount` has the mount do: write what is owed, now."""
        assert self.fill is not None
        assert await self.fill.flush(30)


@asynccontextmanager
async def write_behind(reader: ChunkReader) -> AsyncIterator[PageCache]:
    """The reader's disk cache written as in a mount: chunks fetched are owed to a
    PageCacheFill, written at a flush (and at the end) from memory or from the page
    cache, which holds the blobs it is told it `holds`."""
    async with trio.open_nursery() as nursery:
        kernel = PageCache(nursery)
        kernel.fill = PageCacheFill(reader, kernel.retrieve, quiet=3600)
        reader.defer = kernel.fill.owe
        await nursery.start(kernel.fill.run)
        yield kernel
        await kernel.flush()
        nursery.cancel_scope.cancel()


async def test_concurrent_reads_of_one_chunk_cause_one_fetch(registry, blob, tmp_path) -> None:
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK,
                             disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        results: list[bytes] = []

        async def one(offset: int) -> None:
            results.append(await reader.read(ref, offset, 1000))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, 100 * i)
        assert fetch.calls == [(0, CHUNK)]
        assert sorted(results) == sorted(data[100 * i:100 * i + 1000] for i in range(8))
        assert reader.snapshot()["coalesced"] >= 1
        # A read across a chunk boundary returns exactly the bytes asked for.
        assert await reader.read(ref, CHUNK - 10, 30) == data[CHUNK - 10:CHUNK + 20]
        assert await reader.read(ref, ref.size - 5, 100) == data[-5:]
        assert await reader.read(ref, ref.size, 100) == b""


async def test_disk_cache_survives_restart_and_verifies(registry, blob, tmp_path) -> None:
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with write_behind(reader) as kernel:
            kernel.holds(ref, data)
            assert await reader.read(ref, 0, ref.size) == data
        assert len(fetch.calls) == 11
        hexpart = ref.digest.split(":")[1]
        complete = tmp_path / "blobs" / "sha256" / hexpart
        assert complete.read_bytes() == data  # all chunks arrived: verified and promoted
        assert not (tmp_path / "partial" / "sha256" / f"{hexpart}.chunks").exists()

        # A new reader and cache over the same directory: a restart.
        fetch2 = Counting(client)
        reader2 = ChunkReader(fetch2, chunk_size=CHUNK,
                              disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        assert await reader2.read(ref, 3 * CHUNK + 7, 2 * CHUNK) == data[3 * CHUNK + 7:5 * CHUNK + 7]
        assert fetch2.calls == []
        assert reader2.snapshot()["disk_hits"] == 3  # chunks 3, 4, 5

        # Damage the cached file, keeping its size and times: the next process checks
        # the chunk it reads back, drops the blob and fetches the right bytes.
        st = complete.stat()
        raw = bytearray(complete.read_bytes())
        raw[12345] ^= 0x01
        complete.write_bytes(bytes(raw))
        os.utime(complete, ns=(st.st_atime_ns, st.st_mtime_ns))
        fetch3 = Counting(client)
        reader3 = ChunkReader(fetch3, chunk_size=CHUNK,
                              disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        assert await reader3.read(ref, 0, 100) == data[:100]
        assert not complete.exists()
        assert fetch3.calls == [(0, CHUNK)]
        assert reader3.snapshot()["disk_damaged"] == 1


async def test_partial_cache_resumes_after_restart(registry, blob, tmp_path) -> None:
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with write_behind(reader) as kernel:
            kernel.holds(ref, data)
            await reader.read(ref, 2 * CHUNK, CHUNK)
            await reader.read(ref, 5 * CHUNK, 10)
        fetch2 = Counting(client)
        reader2 = ChunkReader(fetch2, chunk_size=CHUNK,
                              disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with write_behind(reader2) as kernel:
            kernel.holds(ref, data)
            assert await reader2.read(ref, 0, ref.size) == data
        # Chunks 2 and 5 came from disk; the blob was then hashed in order and promoted.
        assert sorted(s // CHUNK for s, _ in fetch2.calls) == [0, 1, 3, 4, 6, 7, 8, 9, 10]
        assert (tmp_path / "blobs" / "sha256" / ref.digest.split(":")[1]).exists()


async def test_wrong_bytes_from_network_are_never_served(registry, blob, tmp_path,
                                                         caplog) -> None:
    """A chunk that does not match the file's table is an error for its reader, with one
    warning and a count; nothing of it is kept, and the next read fetches it again."""
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        fetch.corrupt = True
        disk = DiskCache(tmp_path, 1 << 30, CHUNK)
        reader = ChunkReader(fetch, chunk_size=CHUNK, disk=disk)
        async with write_behind(reader) as kernel:
            kernel.holds(ref, data)
            with pytest.raises(DigestMismatch, match="chunk 3 of .* does not match its chunk "
                                                     "table"):
                await reader.read(ref, 3 * CHUNK + 5, 100)
        assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == [
            "WARNING"]
        assert reader.snapshot()["verify_failures"] == 1
        assert reader.memory.bytes == 0 and kernel.fill.owed == 0
        assert not any(disk.has_chunk(ref.digest, ref.size, i) for i in range(11))
        fetch.corrupt = False
        assert await reader.read(ref, 3 * CHUNK + 5, 100) == data[3 * CHUNK + 5:3 * CHUNK + 105]
        assert fetch.calls == [(3 * CHUNK, 4 * CHUNK)] * 2


async def test_verify_end_serves_an_untabled_blob_and_drops_it_when_complete(
        registry, blob, tmp_path) -> None:
    """`--verify end` (weaker, documented): a blob without a table is served as the
    registry sends it; the write-behind's whole-blob hash catches it afterwards. The blob
    then leaves the disk cache and memory, so later reads fetch it again."""
    ref, data = blob
    ref = BlobRef(ref.repo, ref.digest, ref.size)  # no table
    async with _client(registry) as client:
        fetch = Counting(client)
        fetch.corrupt = True
        disk = DiskCache(tmp_path, 1 << 30, CHUNK)
        reader = ChunkReader(fetch, chunk_size=CHUNK, disk=disk, verify="end")
        async with write_behind(reader) as kernel:
            served = await reader.read(ref, 0, ref.size)
            assert served != data
            kernel.holds(ref, served)
        hexpart = ref.digest.split(":")[1]
        assert not (tmp_path / "blobs" / "sha256" / hexpart).exists()
        assert not (tmp_path / "partial" / "sha256" / f"{hexpart}.data").exists()
        assert reader.memory.bytes == 0  # nothing of the bad blob stays in memory
        assert reader.snapshot()["digest_failures"] == 1
        fetch.corrupt = False
        assert await reader.read(ref, 0, ref.size) == data


async def test_readahead_grows_on_sequential_reads(registry, blob) -> None:
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, window_cap=4 * CHUNK)
        windows = []
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            out = bytearray()
            for offset in range(0, ref.size, 16 << 10):
                out += await handle.read(offset, 16 << 10)
                windows.append(handle.readahead.window)
            handle.close()
        assert bytes(out) == data
        assert windows[0] == 0 and windows[1] == CHUNK
        assert max(windows) == 4 * CHUNK  # doubled up to the cap, not beyond
        assert windows == sorted(windows)
        assert reader.snapshot()["prefetches"] > 0
        # Prefetched chunks were fetched once each, not again by the foreground reads.
        assert len(fetch.calls) == len(set(fetch.calls)) == 11


async def test_no_readahead_on_random_reads(registry, blob) -> None:
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK)
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            for offset in (9 * CHUNK, 0, 5 * CHUNK + 3, 2 * CHUNK, 7 * CHUNK):
                assert await handle.read(offset, 100) == data[offset:offset + 100]
                assert handle.readahead.window == 0
            handle.close()
        assert reader.snapshot()["prefetches"] == 0
        assert sorted(s // CHUNK for s, _ in fetch.calls) == [0, 2, 5, 7, 9]


async def test_small_jumps_do_not_reset_stream() -> None:
    from galleryfs.mount.prefetch import ReadAhead

    ra = ReadAhead(1 << 20, 64 << 20)
    ra.observe(0, 128 << 10)
    ra.observe(128 << 10, 128 << 10)
    assert ra.window == 1 << 20
    ra.observe(3 << 20, 128 << 10)  # kernel readahead ran ahead by a few MiB
    ra.observe((3 << 20) + (64 << 10), 128 << 10)  # ... and a small step back
    assert ra.window > 1 << 20
    ra.observe(500 << 20, 4096)  # a real jump
    assert ra.window == 0


async def test_memory_lru_bound_in_bytes(registry, blob) -> None:
    ref, data = blob
    async with _client(registry) as client:
        reader = ChunkReader(Counting(client), chunk_size=CHUNK, memory_bytes=3 * CHUNK)
        for i in range(11):
            assert await reader.read(ref, i * CHUNK, 10) == data[i * CHUNK:i * CHUNK + 10]
            assert reader.memory.bytes <= 3 * CHUNK
        assert len(reader.memory) == 3
        assert reader.snapshot()["memory_misses"] == 11


async def test_disk_cache_evicts_least_recently_used(registry, tmp_path: Path) -> None:
    blobs = []
    for i in range(3):
        data = bytes([i]) * (2 * CHUNK)
        blobs.append((BlobRef(REPO, push_blob(registry.url, REPO, data), len(data)), data))
    async with _client(registry) as client:
        disk = DiskCache(tmp_path, 5 * CHUNK, CHUNK)
        reader = ChunkReader(Counting(client), chunk_size=CHUNK, disk=disk)
        async with write_behind(reader) as kernel:
            for ref, data in blobs:
                kernel.holds(ref, data)
                assert await reader.read(ref, 0, ref.size) == data
                await kernel.flush()
                assert disk.used_bytes <= 5 * CHUNK
        stored = {p.name for p in (tmp_path / "blobs" / "sha256").iterdir()}
        assert blobs[0][0].digest.split(":")[1] not in stored
        assert blobs[2][0].digest.split(":")[1] in stored
        assert disk.evictions == 1


@pytest.mark.parametrize("verify", ["strict", "end"])
async def test_random_reads_fetch_their_chunks_or_under_end_only_their_bytes(
        registry, blob, verify) -> None:
    """A random read is verified by the chunk it lies in, so it costs that chunk; under
    `--verify end` a blob without a table is read exactly (unverified)."""
    ref, data = blob
    if verify == "end":
        ref = BlobRef(ref.repo, ref.digest, ref.size)
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, verify=verify)
        async with trio.open_nursery() as nursery:
            handle = reader.open(ref, nursery)
            for offset in (9 * CHUNK + 5, 2 * CHUNK, 7 * CHUNK - 4096, 9 * CHUNK + 8000):
                assert await handle.read(offset, 4096) == data[offset:offset + 4096]
            handle.close()
        if verify == "end":
            # One Range request of exactly the bytes asked for, not a chunk each.
            assert fetch.calls == [(9 * CHUNK + 5, 9 * CHUNK + 4101),
                                   (2 * CHUNK, 2 * CHUNK + 4096),
                                   (7 * CHUNK - 4096, 7 * CHUNK),
                                   (9 * CHUNK + 8000, 9 * CHUNK + 12096)]
        else:
            # A chunk each (the last one was in memory already), all verified.
            assert fetch.calls == [(9 * CHUNK, 10 * CHUNK), (2 * CHUNK, 3 * CHUNK),
                                   (6 * CHUNK, 7 * CHUNK)]
            assert reader.snapshot()["verified_chunks"] == 3
        assert reader.snapshot()["prefetches"] == 0


async def test_a_flipped_byte_in_a_complete_cached_blob_is_never_served(
        registry, blob, tmp_path) -> None:
    """Every chunk read back from disk is hashed against the index kept with it (no stamp
    of size and times to fool): a flipped byte whose file keeps its size and mtime costs a
    fetch of its chunk, not a wrong byte."""
    ref, data = blob
    hexpart = ref.digest.split(":")[1]
    async with _client(registry) as client:
        reader = ChunkReader(Counting(client), chunk_size=CHUNK,
                             disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with write_behind(reader) as kernel:
            kernel.holds(ref, data)
            assert await reader.read(ref, 0, ref.size) == data
        complete = tmp_path / "blobs" / "sha256" / hexpart
        index = tmp_path / "blobs" / "sha256" / f"{hexpart}.chunks"
        assert index.stat().st_size == 24 + 11 * (32 + 4)
        for untabled in (False, True):
            with complete.open("r+b") as f:
                f.seek(3 * CHUNK + 77)
                byte = f.read(1)
                f.seek(3 * CHUNK + 77)
                f.write(bytes([byte[0] ^ 0x20]))
            fetch = Counting(client)
            reader = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
            # With the table, and (the second time) without one: the disk's own index.
            which = BlobRef(ref.repo, ref.digest, ref.size) if untabled else ref
            assert await reader.read(which, 3 * CHUNK, 100) == data[3 * CHUNK:3 * CHUNK + 100]
            assert fetch.calls == [(3 * CHUNK, 4 * CHUNK)]
            assert reader.snapshot()["disk_damaged"] == 1
            assert not complete.exists()
            # Cached again, whole, for the second round.
            reader.memory.clear()
            async with write_behind(reader) as kernel:
                kernel.holds(which, data)
                assert await reader.read(which, 0, ref.size) == data
            assert complete.exists()


async def test_old_cache_layouts_are_discarded(tmp_path) -> None:
    """A cache written before chunk indexes (a presence byte per chunk, stamps) is
    emptied, not trusted; other files under the cache folder are left alone."""
    hexpart = "ab" * 32
    old = {tmp_path / "blobs" / "sha256" / hexpart,
           tmp_path / "partial" / "sha256" / f"{hexpart}.data",
           tmp_path / "partial" / "sha256" / f"{hexpart}.chunks",
           tmp_path / "verified" / "sha256" / hexpart}
    for path in old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GFSC\x01\x00\x00\x00" + bytes(100))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "mount-1.log").write_text("kept")
    cache = DiskCache(tmp_path, 1 << 30, CHUNK)
    assert not any(p.exists() for p in old)
    assert not (tmp_path / "verified").exists()
    assert (tmp_path / "logs" / "mount-1.log").read_text() == "kept"
    assert (tmp_path / "FORMAT").read_text() == "3\n"
    assert cache.used_bytes == 0


@pytest.mark.parametrize("refuse_direct", [False, True])
async def test_disk_cache_writes_direct_or_falls_back(tmp_path, monkeypatch, refuse_direct) -> None:
    """Chunks (the last one unaligned) are written with O_DIRECT where the file system
    takes it; a refusal (EINVAL) falls back to buffered writes without losing a chunk."""
    import errno

    from galleryfs.mount import diskcache

    data = os.urandom(3 * CHUNK + 999)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = DiskCache(tmp_path, 1 << 30, CHUNK)
    real_pwrite = os.pwrite
    direct_writes: list[int] = []

    def pwrite(fd: int, buf, offset: int) -> int:  # noqa: ANN001
        if any(p.direct_fd == fd for p in cache._partials.values()):
            direct_writes.append(offset)
            if refuse_direct:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(diskcache.os, "pwrite", pwrite)
    # Out of order, as prefetches complete: the blob is hashed once contiguous.
    for index in (1, 0, 3):
        assert cache.write_chunk(digest, len(data), index, data[index * CHUNK:(index + 1) * CHUNK]) is False
    assert cache.write_chunk(digest, len(data), 2, data[2 * CHUNK:3 * CHUNK]) is True
    complete = tmp_path / "blobs" / "sha256" / digest.split(":")[1]
    assert complete.read_bytes() == data  # the padded last chunk was cut back
    if refuse_direct:
        assert direct_writes == [CHUNK] and cache.direct is False  # tried once, then buffered
    else:
        assert sorted(direct_writes) == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert cache.read_chunk(digest, len(data), 3) == data[3 * CHUNK:]


async def test_holes_are_read_from_the_disk_cache(registry, blob, tmp_path) -> None:
    """A read outside any stream (a page the kernel's cache lost) reads its chunk from a
    complete cached blob, checked: no fetch."""
    ref, data = blob
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        async with write_behind(reader) as kernel:
            kernel.holds(ref, data)
            assert await reader.read(ref, 0, ref.size) == data  # fills the cache
        reader.memory.clear()
        calls, hits = len(fetch.calls), reader.snapshot()["disk_hits"]
        handle = reader.open(ref, None)
        for offset in (5 * CHUNK + 100, 2 * CHUNK - 10):
            assert bytes(await handle.read(offset, 4096)) == data[offset:offset + 4096]
        handle.close()
        assert len(fetch.calls) == calls
        assert reader.snapshot()["disk_hits"] == hits + 3  # the second read spans two chunks


def _lose_blob(registry, digest: str) -> None:  # noqa: ANN001 - harness registry
    """Delete the blob's bytes from the registry's storage (its repository link stays):
    damage, as after a botched garbage collection or a lost storage object."""
    import shutil

    hexpart = digest.split(":")[1]
    path = registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart
    assert path.is_dir(), path
    shutil.rmtree(path)


async def test_a_blob_the_registry_lost_is_damage_not_absence(registry, blob) -> None:
    """A listed file whose blob the registry answers 404 for reads as EIO (BlobMissing),
    not ENOENT: the file exists, its bytes are gone. Through the mount's own fetchers."""
    import errno

    from galleryfs.errors import BlobMissing
    from galleryfs.mount.operations import errno_for
    from galleryfs.registry.ranges import DirectRanges

    ref, _ = blob
    _lose_blob(registry, ref.digest)
    async with _client(registry) as client:
        ranges = DirectRanges(client)
        reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=CHUNK)
        try:
            async with trio.open_nursery() as nursery:
                handle = reader.open(ref, nursery)
                # Offset 0 (a chunk, as a stream starts), then a random read (exact bytes),
                # then a stream whose read-ahead spans fail first.
                for offset in (0, 5 * CHUNK + 7, 100, 200):
                    with pytest.raises(BlobMissing) as caught:
                        await handle.read(offset, 100)
                    assert errno_for(caught.value) == errno.EIO
                handle.close()
        finally:
            ranges.close()


async def test_without_write_behind_reads_write_nothing_to_disk(registry, blob,
                                                                tmp_path) -> None:
    """The write-behind is the only writer of the disk cache: a read alone writes nothing."""
    ref, data = blob
    async with _client(registry) as client:
        disk = DiskCache(tmp_path, 1 << 30, CHUNK)
        reader = ChunkReader(Counting(client), chunk_size=CHUNK, disk=disk)
        assert await reader.read(ref, 0, ref.size) == data
        assert not any(disk.has_chunk(ref.digest, ref.size, i) for i in range(reader.nchunks(ref)))
        assert reader.snapshot()["stores"] == 0


async def test_snapshot_keys(tmp_path) -> None:
    """The counters the stats xattr shows (scripts/bench and the mount tests read them)."""
    async def never(*args: object) -> bytes:
        raise AssertionError("no fetch expected")

    common = {"coalesced", "digest_failures", "disk_hits", "disk_misses", "fetched_bytes",
              "fetches", "in_flight", "memory_bytes", "memory_hits", "memory_limit",
              "memory_misses", "prefetches", "readahead_cap", "readahead_windows", "spans",
              "store_write_s", "stores", "verified_chunks", "verify_failures",
              "derived_blobs", "derived_bytes", "verified_pieces", "piece_bytes"}
    assert set(ChunkReader(never, chunk_size=CHUNK).snapshot()) == common
    with_disk = ChunkReader(never, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
    assert set(with_disk.snapshot()) == common | {"disk_bytes", "disk_evictions", "disk_limit",
                                                  "disk_damaged"}


def _stored_blob(root: Path, nchunks: int = 3) -> tuple[DiskCache, str, bytes]:
    """A complete blob written into a disk cache the way the reader writes it: each chunk
    checked against its table digest."""
    from galleryfs.mount.blob import Expect

    data = os.urandom(nchunks * CHUNK - 500)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = DiskCache(root, 1 << 30, CHUNK)
    for i in range(nchunks):
        piece = data[i * CHUNK:(i + 1) * CHUNK]
        cache.write_chunk(digest, len(data), i, piece,
                          Expect(CHUNK, hashlib.sha256(piece).digest()), checked=True)
    assert cache.table(digest, len(data)) is not None  # complete, promoted
    return cache, digest, data


async def test_chunks_read_back_are_checked_by_their_crc_not_hashed(tmp_path, monkeypatch) -> None:
    """A chunk read back from disk is checked against the CRC32C its index keeps and
    served when the sha256 its index keeps (checked when it was written) is the one the
    reader expects: no sha256 of the bytes (it cost G4 a fifth of its speed). A flipped
    byte in the data, or in the CRC, is damage: dropped, never served."""
    from galleryfs.mount import diskcache
    from galleryfs.mount.blob import Expect

    cache, digest, data = _stored_blob(tmp_path)
    size = len(data)

    def no_hashing(*args: object) -> None:
        raise AssertionError("a chunk read back was hashed")

    monkeypatch.setattr(diskcache.hashlib, "sha256", no_hashing)

    def expect(i: int) -> Expect:
        return Expect(CHUNK, hashlib.new("sha256", data[i * CHUNK:(i + 1) * CHUNK]).digest())

    fresh = DiskCache(tmp_path, 1 << 30, CHUNK)
    for i in range(3):
        assert fresh.read_chunk(digest, size, i, expect(i)) == data[i * CHUNK:(i + 1) * CHUNK]
    assert fresh.read_chunk(digest, size, 2) == data[2 * CHUNK:]  # --verify end: its CRC
    # Another claim's table: not these bytes, not served, and not damage.
    other = Expect(CHUNK, bytes(32))
    assert fresh.read_chunk(digest, size, 1, other) is None
    assert fresh.damaged == 0
    hexpart = digest.split(":")[1]
    blob_file = tmp_path / "blobs" / "sha256" / hexpart
    with blob_file.open("r+b") as f:
        f.seek(CHUNK + 5)
        byte = f.read(1)
        f.seek(CHUNK + 5)
        f.write(bytes([byte[0] ^ 1]))
    assert fresh.read_chunk(digest, size, 1, expect(1)) is None
    assert fresh.damaged == 1
    assert not blob_file.exists()  # a complete blob is dropped whole

    # The CRC itself damaged (index entry of chunk 0), in a fresh copy of the blob.
    monkeypatch.undo()
    cache, digest, data = _stored_blob(tmp_path / "again")
    index = tmp_path / "again" / "blobs" / "sha256" / (digest.split(":")[1] + ".chunks")
    raw = bytearray(index.read_bytes())
    raw[24 + 3 * 32] ^= 0x80  # the first CRC, after the header and 3 digests
    index.write_bytes(bytes(raw))
    fresh = DiskCache(tmp_path / "again", 1 << 30, CHUNK)
    assert fresh.read_chunk(digest, len(data), 0, expect(0)) is None
    assert fresh.damaged == 1


async def test_a_cache_without_crcs_is_discarded(tmp_path) -> None:
    """A cache of the previous layout (format 2: chunk indexes of sha256 digests only) is
    emptied when a mount opens it, not served: its chunks were checked by hashing them,
    and an index without CRCs cannot check them now."""
    import struct

    data = os.urandom(2 * CHUNK)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    hexpart = digest.split(":")[1]
    folder = tmp_path / "blobs" / "sha256"
    folder.mkdir(parents=True)
    (folder / hexpart).write_bytes(data)
    (folder / f"{hexpart}.chunks").write_bytes(
        struct.pack("<4sIQQ", b"GFSC", 2, CHUNK, len(data))
        + hashlib.sha256(data[:CHUNK]).digest() + hashlib.sha256(data[CHUNK:]).digest())
    (tmp_path / "FORMAT").write_text("2\n")
    cache = DiskCache(tmp_path, 1 << 30, CHUNK)
    assert cache.read_chunk(digest, len(data), 0) is None
    assert cache.table(digest, len(data)) is None
    assert not (folder / hexpart).exists()
    assert (tmp_path / "FORMAT").read_text() == "3\n"
