"""Chunked, cached, read-ahead reads of registry blobs. No FUSE here.

A blob is read in fixed-size aligned chunks. A chunk comes from, in order: memory or a
load already in flight (chunkcache.py: two readers of one chunk cause one request), the
disk cache (diskstore.py), the registry (fetch.py, bounded in time). The reader is where
these meet; each knows nothing of the others.

`BlobHandle` is one open file. Its reads tell its read-ahead stream (prefetch.py) where
they are; the stream decides what to fetch ahead and asks the reader for it through a
few questions (the `prefetch.Source` interface). Random access fetches only what is
asked for: a read that is not part of a stream and finds its chunk neither in memory nor
in flight reads exactly its bytes, from the disk cache or the registry, so 4 KiB random
reads (or a hole the kernel's page cache lost) do not cost a chunk each.

A chunk fetched from the registry is not written to the disk cache during the read (a
cache write competes with the read it caches): it is announced to the write-behind
(`defer`, writeback.PageCacheFill.owe), which writes it once reads pause. Reads return
memoryviews into the cached chunk (pyfuse3 takes any buffer), so a byte is copied once
from the socket into its chunk and once into the kernel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import DigestMismatch, first_error
from .blob import BlobRef, Chunk
from .chunkcache import Abandoned, ChunkCache, Span
from .diskcache import DiskCache
from .diskstore import DiskStats, DiskStore
from .fetch import BlobFetch, Fetcher, SpanFetcher
from .prefetch import WINDOW_CAP, Prefetcher, Stream

__all__ = ["DEFAULT_CHUNK", "DEFAULT_MEMORY", "WINDOW_CAP", "BlobHandle", "BlobRef",
           "ChunkReader"]

log = logging.getLogger(__name__)

# 8 MiB chunks read faster cold (fewer requests) but, with the read-ahead window, cost
# more of the daemon's peak RSS than 4 MiB (scripts/bench G1, G9); `galleryfs mount`
# passes 4M.
DEFAULT_CHUNK = 4 << 20
# The prefetch window plus the chunk being read: a stream drops the chunks it has passed
# from memory (they live on in the kernel's page cache, keep_cache, until the
# write-behind has them on disk), so a larger budget would only raise the daemon's RSS.
DEFAULT_MEMORY = WINDOW_CAP + DEFAULT_CHUNK


@dataclass
class ReadStats:
    memory_hits: int = 0
    memory_misses: int = 0
    coalesced: int = 0  # chunk reads that waited for a load in flight


class ChunkReader:
    def __init__(
        self,
        fetch: Fetcher,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        memory_bytes: int = DEFAULT_MEMORY,
        disk: DiskCache | None = None,
        fetch_timeout: float = 60.0,
        prefetch_concurrency: int = 2,
        window_cap: int = WINDOW_CAP,
        span_fetch: SpanFetcher | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk size must be positive")
        if disk is not None and disk.chunk_size != chunk_size:
            raise ValueError("disk cache and reader disagree on the chunk size")
        self.chunk_size = chunk_size
        self.memory = ChunkCache(memory_bytes)
        self.fetcher = BlobFetch(fetch, span_fetch, timeout=fetch_timeout)
        self.disk = DiskStore(disk) if disk is not None else None
        self.prefetcher = Prefetcher(self, spans=span_fetch is not None,
                                     window_cap=window_cap, concurrency=prefetch_concurrency)
        self.stats = ReadStats()
        # The write-behind (writeback.PageCacheFill.owe): told of every chunk fetched
        # from the registry for a blob the disk cache takes. None: such chunks are not
        # cached on disk.
        self.defer: Callable[[BlobRef, int], None] | None = None

    def nchunks(self, blob: BlobRef) -> int:
        return math.ceil(blob.size / self.chunk_size)

    # ---- for the FUSE layer --------------------------------------------------------

    def open(self, blob: BlobRef, nursery: trio.Nursery | None) -> BlobHandle:
        """An open file; its read-ahead runs in `nursery` (None: no read-ahead)."""
        if self.disk is not None:
            self.disk.pin(blob)
        return BlobHandle(self, blob, self.prefetcher.stream(blob, nursery))

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {**self.stats.__dict__, **self.fetcher.stats.__dict__,
                                  "prefetches": self.prefetcher.prefetches}
        # Disk counters are there (as zeros) without a disk cache too.
        out.update(self.disk.snapshot() if self.disk is not None else DiskStats().snapshot())
        out["memory_bytes"] = self.memory.bytes
        out["memory_limit"] = self.memory.limit
        out["in_flight"] = self.memory.flying
        out["readahead_windows"] = self.prefetcher.windows()
        out["readahead_cap"] = self.prefetcher.window_cap
        return out

    # ---- reads ---------------------------------------------------------------------

    async def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the blob, short only at its end."""
        return bytes(await self.read_view(blob, offset, size))

    async def read_view(self, blob: BlobRef, offset: int, size: int) -> memoryview | bytes:
        """As `read`, without copying when the range lies in one chunk."""
        end = min(blob.size, offset + size)
        if offset >= end:
            return b""
        first = offset // self.chunk_size
        last = (end - 1) // self.chunk_size
        if first == last:
            skip = offset - first * self.chunk_size
            return memoryview(await self.chunk(blob, first))[skip: skip + end - offset]
        found: dict[int, Chunk] = {}

        async def get(i: int) -> None:
            found[i] = await self.chunk(blob, i)

        try:
            async with trio.open_nursery() as nursery:
                for i in range(first, last + 1):
                    nursery.start_soon(get, i)
        except BaseExceptionGroup as group:
            # Callers map single galleryfs errors to errno; a group would hide them.
            raise first_error(group) from None
        out = bytearray(end - offset)
        pos = 0
        for i in range(first, last + 1):
            base = i * self.chunk_size
            lo, hi = max(offset, base) - base, min(end, base + self.chunk_size) - base
            out[pos: pos + hi - lo] = memoryview(found[i])[lo:hi]
            pos += hi - lo
        return memoryview(out)

    async def read_exact(self, blob: BlobRef, start: int, end: int) -> Chunk:
        """Bytes [start, end) from the disk cache if it has them all, else the registry;
        kept nowhere."""
        if self.disk is not None:
            data = await self.disk.read_range(blob, start, end)
            if data is not None:
                return data
        return await self.fetcher.range(blob, start, end)

    async def chunk(self, blob: BlobRef, index: int) -> Chunk:
        """The chunk's bytes, from memory, a load in flight, disk or the registry."""
        key = (blob.digest, index)
        memory = self.memory
        while True:
            data = memory.get(key)
            if data is not None:
                self.stats.memory_hits += 1
                return data
            flight = memory.flight(key)
            if flight is None:
                break
            self.stats.coalesced += 1
            data = await flight.wait()
            if data is not None:
                return data
            # Its loader (a prefetch) gave it up: try again, as loader this time.
        self.stats.memory_misses += 1
        flight = memory.claim(key)
        try:
            fetched = False
            data = await self.disk.read_chunk(blob, index) if self.disk is not None else None
            if data is None:
                start = index * self.chunk_size
                data = await self.fetcher.range(
                    blob, start, min(blob.size, start + self.chunk_size))
                fetched = True
        except trio.Cancelled:
            memory.fail(key, flight, Abandoned())
            raise
        except BaseException as exc:
            memory.fail(key, flight, exc)
            raise
        memory.settle(key, flight, data)
        if fetched:
            self._owe(blob, index)
        return data

    def _owe(self, blob: BlobRef, index: int) -> None:
        if self.defer is not None and self.disk is not None and self.disk.takes(blob):
            self.defer(blob, index)

    # ---- for read-ahead (prefetch.Source) ------------------------------------------

    def at_hand(self, blob: BlobRef, index: int) -> bool:
        return self.memory.at_hand((blob.digest, index))

    def in_memory(self, blob: BlobRef, index: int) -> bool:
        return self.memory.holds((blob.digest, index))

    def on_disk(self, blob: BlobRef, index: int) -> bool:
        return self.disk is not None and self.disk.has(blob, index)

    def claim_span(self, blob: BlobRef, first: int, last: int) -> Span | None:
        """Claim chunks first..last for one range request (a read-ahead stream): from
        now on readers of them wait for it rather than fetch them themselves.

        The registry spends far less CPU per byte on a few long ranges than on many
        chunk-sized ones (scripts/bench G1). Chunks already in memory, in flight or on
        disk are not claimed: the span ends before the first of them. Run the result
        with `fetch_span`, which always releases what it did not deliver.
        """
        if not self.fetcher.spans:
            return None
        disk = self.disk if self.disk is not None and self.disk.takes(blob) else None
        memory = self.memory
        flights = {}
        for i in range(first, last + 1):
            key = (blob.digest, i)
            if memory.at_hand(key) or disk is not None and disk.has(blob, i):
                break
            flights[i] = memory.claim(key)
        return Span(blob, flights) if flights else None

    async def fetch_span(self, span: Span) -> None:
        blob, flights, cs, memory = span.blob, span.flights, self.chunk_size, self.memory
        first = next(iter(flights))
        end = min(blob.size, (first + len(flights)) * cs)

        def take(offset: int, data: bytearray) -> bool:
            index = offset // cs
            if not memory.deliver(span, index, data):
                return False  # given up meanwhile
            self._owe(blob, index)
            return True

        try:
            await self.fetcher.span(blob, first * cs, end, cs, take)
        finally:
            memory.release(span)

    def release_span(self, span: Span) -> None:
        """Give up what the span did not deliver (an error, a timeout, a cancel, a span
        that never ran): its readers fetch those chunks on their own."""
        self.memory.release(span)

    def drop_behind(self, blob: BlobRef, start: int, end: int) -> int:
        # Only chunks the disk cache will hold (owed to the write-behind, meanwhile in
        # the kernel's page cache): a late or out-of-order read of one then costs a page
        # cache or disk read, not a fetch. In flight ones are skipped, not waited for.
        if self.defer is None or self.disk is None or not self.disk.takes(blob):
            return start
        reached = start
        for i in range(start, end):
            key = (blob.digest, i)
            if self.memory.in_flight(key):
                continue
            self.memory.drop(key)
            reached = i + 1
        return reached

    # ---- for the write-behind (writeback.Source) -----------------------------------

    def held(self, blob: BlobRef, index: int) -> Chunk | None:
        return self.memory.get((blob.digest, index))

    async def fetch_range(self, blob: BlobRef, start: int, end: int) -> Chunk:
        """Bytes [start, end) straight from the registry, kept nowhere."""
        return await self.fetcher.range(blob, start, end)

    async def store(self, blob: BlobRef, index: int, data: Chunk) -> None:
        """Write a chunk to the disk cache now. A blob that fails its digest is dropped
        from disk and memory (later reads fetch it again) and logged, not raised."""
        if self.disk is None:
            return
        try:
            await self.disk.write(blob, index, data)
        except DigestMismatch as exc:
            self.memory.drop_blob(blob.digest, self.nchunks(blob))
            log.warning("%s", exc)


class BlobHandle:
    """One open file: reads through the ChunkReader, its stream reading ahead."""

    def __init__(self, reader: ChunkReader, blob: BlobRef, stream: Stream) -> None:
        self.reader = reader
        self.blob = blob
        self.stream = stream
        self.readahead = stream.readahead
        self.closed = False

    async def read(self, offset: int, size: int) -> memoryview | bytes:
        window = self.readahead.observe(offset, size)
        reader = self.reader
        end = min(self.blob.size, offset + size)
        if (not window and offset != 0 and offset < end
                and not any(reader.at_hand(self.blob, i) for i in range(
                    offset // reader.chunk_size, (end - 1) // reader.chunk_size + 1))):
            # Not a stream (offset 0 is taken as the start of one), and no chunk in
            # memory: read just these bytes, from disk or the registry, rather than a
            # whole chunk (a hole in the kernel's cache costs a page, not a chunk).
            return await reader.read_exact(self.blob, offset, end)
        data = await reader.read_view(self.blob, offset, size)
        if window:
            self.stream.advance(offset + len(data), window)
        return data

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.close()
        if self.reader.disk is not None:
            self.reader.disk.unpin(self.blob)
