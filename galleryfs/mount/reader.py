"""Chunked, cached, read-ahead reads of registry blobs. No FUSE here.

A blob is read in fixed-size aligned chunks (Range requests). A chunk comes from, in
order: the in-memory LRU (bounded in bytes), a fetch already in flight (two readers of
one chunk cause one request), the disk cache, the registry. Every network fetch is
bounded in time, so a dead registry turns into an error, not a hang.

`BlobHandle` is one open file: it watches the access pattern and, when reads are
sequential, fetches ahead in a window that starts at one chunk and doubles up to a cap
for every chunk consumed. With a span fetcher the window is refilled when half of it is
left, the gap claimed at once and fetched with one Range request (`begin_span`,
`run_span`); without one, chunk by chunk. Kernel readahead and mmap faults arrive
slightly out of order, so a forward skip of a few chunks or a step back of a quarter
chunk does not break a stream. Random access fetches only what is asked for: a read that
is not part of a stream and finds its chunk in neither memory nor flight reads exactly
its bytes, from the disk cache or the registry, so 4 KiB random reads (or a hole the
kernel's page cache lost) do not cost a chunk each.

The reply path does no disk work it can avoid: a fetched chunk is handed to waiting
readers first, and its owner (usually a prefetch) then hands it to a store worker,
which writes and hashes it in a worker thread. Nothing queues in between, so a slow disk
slows the read-ahead instead of piling chunks up in memory. Reads return memoryviews into the
cached chunk (pyfuse3 takes any buffer), so a byte is copied once from the socket into
its chunk and once into the kernel.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import cachetools
import trio

from ..errors import DigestMismatch, RegistryUnavailable, first_error
from .diskcache import DiskCache

log = logging.getLogger(__name__)

# 8 MiB chunks read ~10-25% faster cold (fewer requests) but, with the window below,
# peaked at ~115-125 MiB RSS against ~85 MiB for 4 MiB; `galleryfs mount` passes 4M.
DEFAULT_CHUNK = 4 << 20
WINDOW_CAP = 32 << 20
# The prefetch window plus the chunk being read: a stream drops the chunks it has passed
# from memory (they live on in the kernel's page cache, keep_cache, and the disk cache),
# so a larger budget would only raise the daemon's RSS.
DEFAULT_MEMORY = WINDOW_CAP + DEFAULT_CHUNK
# Stream tolerances: a forward skip of 16 MiB (at least two chunks) and a step back of
# a quarter chunk keep a running stream going (as in Mountpoint for S3).
SEQ_FORWARD = 16 << 20
SEQ_BACK_FRACTION = 4
# Starting a stream takes a read that continues the previous one (within a page): with
# the running-stream tolerances, one random 4 KiB read in ~60 over a GiB would look
# sequential and cost a whole chunk of read-ahead.
SEQ_START_SLACK = 4096
# Chunks waiting for the disk cache besides the ones being written: none. A fetcher
# hands its chunk to an idle writer or waits, so the backlog of chunks the reader has
# passed is at most the writers' two. A one-chunk queue bought no measurable speed (G1
# medians 238-276 against 242-258 MB/s, three runs each way on the bench VM) and cost
# ~6 MiB of the daemon's peak RSS (G9 76-85 against 84-92 MiB).
STORE_QUEUE = 0
STORE_WORKERS = 2

# (repo, digest, start, end) -> exactly bytes [start, end)
Fetcher = Callable[[str, str, int, int], Awaitable[bytes | bytearray]]
Chunk = bytes | bytearray
# (offset, bytes) of one piece of a span, handed over as it arrives
Deliver = Callable[[int, bytearray], Awaitable[None]]
# (repo, digest, start, end, piece size, deliver): bytes [start, end) with one request,
# delivered piece by piece in order; returns the offset reached (end unless it failed)
SpanFetcher = Callable[[str, str, int, int, int, Deliver], Awaitable[int]]


@dataclass(frozen=True)
class BlobRef:
    repo: str
    digest: str
    size: int


@dataclass
class ChunkStats:
    memory_hits: int = 0
    memory_misses: int = 0
    disk_hits: int = 0
    disk_misses: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    coalesced: int = 0
    prefetches: int = 0
    spans: int = 0
    digest_failures: int = 0
    stores_pending_max: int = 0
    # Where the disk cache costs reads: chunks written, the time spent writing (and
    # hashing) them, and the time fetchers waited to hand a chunk to the full queue.
    stores: int = 0
    store_write_ns: int = 0
    store_wait_ns: int = 0


class _Cancelled(Exception):
    """The fetch a reader waited on was cancelled (a closed file's prefetch)."""


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: Chunk | None = None
    error: BaseException | None = None


@dataclass
class _Span:
    blob: BlobRef
    flights: dict[int, _Flight]  # by chunk index, contiguous; emptied as delivered


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
        self.fetch = fetch
        self.span_fetch = span_fetch
        self.chunk_size = chunk_size
        self.memory: cachetools.LRUCache[tuple[str, int], Chunk] = cachetools.LRUCache(
            maxsize=memory_bytes, getsizeof=len)
        self.disk = disk
        self.fetch_timeout = fetch_timeout
        self.window_cap = window_cap
        self.prefetch_limiter = trio.CapacityLimiter(prefetch_concurrency)
        self.stats = ChunkStats()
        self._flights: dict[tuple[str, int], _Flight] = {}
        # Disk-cache writes: a short queue drained by a few worker tasks (see chunk()).
        self._store_send, self._store_recv = trio.open_memory_channel[
            tuple[BlobRef, int, Chunk]](STORE_QUEUE)
        self._store_workers = 0
        self._queued = 0  # queued or being written
        self._stores_idle = trio.Event()
        self._stores_idle.set()
        self._handles: weakref.WeakSet[BlobHandle] = weakref.WeakSet()
        # Write-behind (fill.PageCacheFill.owe): when set, a fetched chunk is announced
        # here instead of being written to the disk cache.
        self.defer: Callable[[BlobRef, int], None] | None = None

    def nchunks(self, blob: BlobRef) -> int:
        return math.ceil(blob.size / self.chunk_size)

    def cached_in_memory(self, blob: BlobRef, index: int) -> bool:
        return (blob.digest, index) in self.memory

    def in_flight(self, blob: BlobRef, index: int) -> bool:
        return (blob.digest, index) in self._flights

    def at_hand(self, blob: BlobRef, index: int) -> bool:
        """The chunk is in memory or on its way there."""
        key = (blob.digest, index)
        return key in self.memory or key in self._flights

    async def read_exact(self, blob: BlobRef, start: int, end: int) -> Chunk:
        """Bytes [start, end) from the disk cache if it has them all, else the registry;
        stored nowhere."""
        disk = self.disk
        if disk is not None and DiskCache.cacheable(blob.digest):
            data = await self._from_disk(blob, disk.read_range, start, end)
            if data is not None:
                return data
        return await self.fetch_range(blob, start, end)

    async def _from_disk(self, blob: BlobRef, read: Callable[..., bytes | None],
                         *args: int) -> bytes | None:
        """`read(digest, size, *args)` of the disk cache in a thread; None when it has
        not got the bytes or cannot read them (a broken cache disk costs a fetch)."""
        try:
            data = await trio.to_thread.run_sync(read, blob.digest, blob.size, *args)
        except DigestMismatch:
            self.stats.digest_failures += 1
            raise
        except OSError as exc:
            log.warning("disk cache read of %s failed (%s); fetching", blob.digest, exc)
            return None
        if data is not None:
            self.stats.disk_hits += 1
        return data

    async def fetch_range(self, blob: BlobRef, start: int, end: int) -> Chunk:
        """Bytes [start, end) straight from the registry, cached nowhere."""
        with trio.move_on_after(self.fetch_timeout) as scope:
            data = await self.fetch(blob.repo, blob.digest, start, end)
        if scope.cancelled_caught:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: no data within {self.fetch_timeout:g}s")
        if len(data) != end - start:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: got {len(data)} bytes for a {end - start} byte range")
        self.stats.fetches += 1
        self.stats.fetched_bytes += len(data)
        return data

    async def chunk(self, blob: BlobRef, index: int) -> Chunk:
        """The chunk's bytes, from memory, a fetch in flight, disk or the registry."""
        key = (blob.digest, index)
        while True:
            data = self.memory.get(key)
            if data is not None:
                self.stats.memory_hits += 1
                return data
            flight = self._flights.get(key)
            if flight is None:
                break
            self.stats.coalesced += 1
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            if not isinstance(flight.error, _Cancelled):
                assert flight.error is not None
                raise flight.error
            # The owner was a cancelled prefetch: try again, as owner this time.
        self.stats.memory_misses += 1
        flight = _Flight()
        self._flights[key] = flight
        try:
            data, fetched = await self._load(blob, index)
        except trio.Cancelled:
            flight.error = _Cancelled()
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.data = data
            try:
                self.memory[key] = data
            except ValueError:  # a chunk larger than the whole memory budget
                pass
        finally:
            del self._flights[key]
            flight.done.set()
        # Waiting readers have their bytes; the owner now hands the chunk to a store
        # worker. When the disk falls behind, the owner waits here (a prefetch holding
        # its slot, or a reader), so memory stays bounded rather than chunks piling up
        # for the disk.
        if fetched:
            await self._queue_store(blob, index, data)
        return data

    def begin_span(self, blob: BlobRef, first: int, last: int) -> _Span | None:
        """Claim chunks first..last for one range request (a read-ahead stream): from
        now on readers of them wait for it rather than fetch them themselves.

        The registry spends far less per byte on a few long ranges than on many chunk
        sized ones (about 2.3 s of its CPU per GiB in 4 MiB ranges, 1.0 s in 32 MiB
        ones, on the 2-core bench machine). Chunks already in memory, in flight or on
        disk are not claimed: the span ends before the first of them. Run the result
        with `run_span`, which always releases what it did not deliver.
        """
        assert self.span_fetch is not None
        disk = self.disk if self.disk is not None and DiskCache.cacheable(blob.digest) else None
        flights: dict[int, _Flight] = {}
        for i in range(first, last + 1):
            if self.at_hand(blob, i) or disk is not None and disk.has_chunk(
                    blob.digest, blob.size, i):
                break
            flights[i] = self._flights[(blob.digest, i)] = _Flight()
        return _Span(blob, flights) if flights else None

    async def run_span(self, span: _Span) -> None:
        assert self.span_fetch is not None
        blob, flights, cs = span.blob, span.flights, self.chunk_size
        first, last = min(flights), max(flights)

        async def deliver(offset: int, data: bytearray) -> None:
            index = offset // cs
            flight = flights.pop(index, None)
            if flight is None:  # the span was given up meanwhile
                return
            self.stats.fetches += 1
            self.stats.fetched_bytes += len(data)
            self._settle(blob, index, flight, data)
            await self._queue_store(blob, index, data)

        try:
            self.stats.spans += 1
            with trio.move_on_after(self.fetch_timeout * (last - first + 1)):
                await self.span_fetch(blob.repo, blob.digest, first * cs,
                                      min(blob.size, (last + 1) * cs), cs, deliver)
        finally:
            self.release_span(span)

    def release_span(self, span: _Span) -> None:
        """Give up what the span did not deliver (an error, a timeout, a cancel, a span
        that never ran): its readers fetch those chunks on their own."""
        for index, flight in span.flights.items():
            flight.error = _Cancelled()
            self._flights.pop((span.blob.digest, index), None)
            flight.done.set()
        span.flights.clear()

    def _settle(self, blob: BlobRef, index: int, flight: _Flight, data: Chunk) -> None:
        flight.data = data
        try:
            self.memory[(blob.digest, index)] = data
        except ValueError:  # a chunk larger than the whole memory budget
            pass
        self._flights.pop((blob.digest, index), None)
        flight.done.set()

    async def _queue_store(self, blob: BlobRef, index: int, data: Chunk) -> None:
        if self.disk is None or not DiskCache.cacheable(blob.digest):
            return
        if self.defer is not None:
            self.defer(blob, index)
            return
        if not self._store_workers:  # none started (tests, tools): store inline
            await self._store(blob, index, data)
            return
        self._queued += 1
        if self._stores_idle.is_set():
            self._stores_idle = trio.Event()
        self.stats.stores_pending_max = max(self.stats.stores_pending_max, self._queued)
        t0 = time.perf_counter_ns()
        try:
            await self._store_send.send((blob, index, data))
        except BaseException:
            self._queued -= 1
            if not self._queued:
                self._stores_idle.set()
            raise
        finally:  # a fetch cancelled while it waited waited too
            self.stats.store_wait_ns += time.perf_counter_ns() - t0

    async def flush(self) -> None:
        """Wait until every chunk handed to the store workers is on disk."""
        while self._queued:
            await self._stores_idle.wait()

    async def store_workers(self, count: int = STORE_WORKERS, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the disk-cache writers until cancelled (in the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self._store_worker, self._store_recv.clone())
            self._store_workers = count
            task_status.started()

    async def _store_worker(self, receive: trio.MemoryReceiveChannel[tuple[BlobRef, int, Chunk]]
                            ) -> None:
        async with receive:
            async for blob, index, data in receive:
                try:
                    await self.store(blob, index, data)
                finally:
                    self._queued -= 1
                    if not self._queued:
                        self._stores_idle.set()

    async def store(self, blob: BlobRef, index: int, data: Chunk) -> None:
        """Write a chunk to the disk cache now, for a store worker or the write-behind:
        a blob that fails its digest is logged, not raised."""
        try:
            await self._store(blob, index, data)
        except DigestMismatch as exc:
            # Already dropped from disk and memory: later reads fetch it again.
            log.warning("%s", exc)

    async def _store(self, blob: BlobRef, index: int, data: Chunk) -> None:
        disk = self.disk
        if disk is None or not DiskCache.cacheable(blob.digest):
            return
        await self._store_now(disk, blob, index, data)

    async def _store_now(self, disk: DiskCache, blob: BlobRef, index: int, data: Chunk) -> None:
        t0 = time.perf_counter_ns()
        try:
            await trio.to_thread.run_sync(
                disk.write_chunk, blob.digest, blob.size, index, data)
            # Counted with the chunks written, so that their ratio is a chunk's cost.
            self.stats.stores += 1
            self.stats.store_write_ns += time.perf_counter_ns() - t0
        except DigestMismatch:
            self.stats.digest_failures += 1
            self._forget_memory(blob)
            raise
        except OSError as exc:
            # A full or broken cache disk costs refetches, not reads.
            log.warning("disk cache write of %s failed: %s", blob.digest, exc)

    async def _load(self, blob: BlobRef, index: int) -> tuple[Chunk, bool]:
        """The chunk, and whether it came from the network (and is not on disk yet)."""
        start = index * self.chunk_size
        end = min(blob.size, start + self.chunk_size)
        disk = self.disk if self.disk is not None and DiskCache.cacheable(blob.digest) else None
        if disk is not None:
            data = await self._from_disk(blob, disk.read_chunk, index)
            if data is not None:
                return data, False
            self.stats.disk_misses += 1
        return await self.fetch_range(blob, start, end), True

    def _forget_memory(self, blob: BlobRef) -> None:
        for i in range(self.nchunks(blob)):
            self.memory.pop((blob.digest, i), None)

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
        else:
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

    def open(self, blob: BlobRef, nursery: trio.Nursery | None) -> BlobHandle:
        handle = BlobHandle(self, blob, nursery)
        self._handles.add(handle)
        if self.disk is not None and DiskCache.cacheable(blob.digest):
            self.disk.pin(blob.digest)
        return handle

    def windows(self) -> list[int]:
        """The read-ahead window of every open handle, in bytes."""
        return sorted((h.readahead.window for h in self._handles if not h.closed),
                      reverse=True)

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.stats.__dict__)
        for key in ("store_write_ns", "store_wait_ns"):
            out[key.replace("_ns", "_s")] = round(out.pop(key) / 1e9, 3)  # type: ignore[operator]
        out["memory_bytes"] = self.memory.currsize
        out["memory_limit"] = self.memory.maxsize
        out["in_flight"] = len(self._flights)
        out["readahead_windows"] = self.windows()
        out["readahead_cap"] = self.window_cap
        if self.disk is not None:
            out["disk_bytes"] = self.disk.used_bytes
            out["disk_limit"] = self.disk.max_bytes
            out["disk_evictions"] = self.disk.evictions
        return out


class ReadAhead:
    """Sequential-access detection and window sizing for one open file (pure logic)."""

    def __init__(self, chunk_size: int, cap: int = WINDOW_CAP) -> None:
        self.chunk_size = chunk_size
        self.cap = max(cap, chunk_size)
        self.window = 0
        self.forward = max(SEQ_FORWARD, 2 * chunk_size)
        self.back = chunk_size // SEQ_BACK_FRACTION
        self.last_end: int | None = None
        self._grow_mark = -1  # chunk index where the window last grew

    def observe(self, offset: int, size: int) -> int:
        """Record a read; return the window to keep fetched beyond its end."""
        end = offset + size
        if self.last_end is None:
            near = False
        elif self.window:
            near = self.last_end - self.back <= offset <= self.last_end + self.forward
        else:
            near = abs(offset - self.last_end) <= SEQ_START_SLACK
        if near:
            assert self.last_end is not None
            chunk = end // self.chunk_size
            if self.window == 0:
                self.window = self.chunk_size
                self._grow_mark = chunk
            elif chunk > self._grow_mark:
                self.window = min(self.cap, self.window * 2)
                self._grow_mark = chunk
            self.last_end = max(self.last_end, end)
        else:
            # First read, or a jump: fetch only what is asked until a stream shows.
            self.window = 0
            self.last_end = end
        return self.window


class BlobHandle:
    """One open file: reads through the ChunkReader, prefetching when sequential."""

    def __init__(self, reader: ChunkReader, blob: BlobRef, nursery: trio.Nursery | None) -> None:
        self.reader = reader
        self.blob = blob
        self.nursery = nursery
        self.readahead = ReadAhead(reader.chunk_size, reader.window_cap)
        self.closed = False
        self._scopes: set[trio.CancelScope] = set()
        self._scheduled: set[int] = set()
        self._dropped = 0  # chunks below this index were dropped behind the stream

    async def read(self, offset: int, size: int) -> memoryview | bytes:
        window = self.readahead.observe(offset, size)
        reader = self.reader
        end = min(self.blob.size, offset + size)
        if (not window and offset != 0 and offset < end
                and not any(reader.at_hand(self.blob, i) for i in range(
                    offset // reader.chunk_size, (end - 1) // reader.chunk_size + 1))):
            # Not a stream (offset 0 is taken as the start of one), and no chunk in
            # memory: read just these bytes, from disk or the registry, rather than a
            # whole chunk (a hole in the kernel's cache costs a page, not 4 MiB).
            return await reader.read_exact(self.blob, offset, end)
        data = await reader.read_view(self.blob, offset, size)
        if window and self.nursery is not None and not self.closed:
            self._schedule(offset + len(data), window)
        return data

    def _schedule(self, pos: int, window: int) -> None:
        reader = self.reader
        first = pos // reader.chunk_size
        last = min(reader.nchunks(self.blob) - 1, (pos + window - 1) // reader.chunk_size)
        # Forget what lies behind the stream so the set stays small.
        self._scheduled = {i for i in self._scheduled if i >= first}
        # Drop behind: chunks the stream has passed leave memory (a late or
        # out-of-order read of one costs a disk cache read, not a fetch). Done only
        # when there is a disk cache to get them from. With write-behind (`defer`) the
        # kernel's page cache holds them until they are written (a late read of one it
        # dropped meanwhile fetches it again): kept here, two streams' passed chunks
        # pushed each other's read-ahead out of memory, and a third of two 1 GiB reads
        # was fetched twice.
        if (first > self._dropped and reader.disk is not None
                and DiskCache.cacheable(self.blob.digest)):
            for i in range(self._dropped, first):
                if reader.in_flight(self.blob, i):
                    continue
                if reader.defer is None and not reader.disk.has_chunk(
                        self.blob.digest, self.blob.size, i):
                    break  # not stored yet: keep it (and what follows) for now
                reader.memory.pop((self.blob.digest, i), None)
                self._dropped = i + 1
        assert self.nursery is not None

        def covered(i: int) -> bool:
            return i in self._scheduled or reader.at_hand(self.blob, i)

        if reader.span_fetch is None:
            for i in range(first, last + 1):
                if not covered(i):
                    self._scheduled.add(i)
                    self.nursery.start_soon(self._prefetch, i)
            return
        # Refill only when less than half the window is at hand or on its way, then in
        # long spans: fewer, longer requests (see ChunkReader.fetch_span).
        ahead = 0
        while first + ahead <= last and covered(first + ahead):
            ahead += 1
        if ahead and 2 * ahead >= last - first + 1:
            return
        disk = reader.disk if reader.disk is not None and DiskCache.cacheable(
            self.blob.digest) else None
        run: list[int] = []
        for i in range(first, last + 2):
            on_disk = i <= last and not covered(i) and disk is not None and disk.has_chunk(
                self.blob.digest, self.blob.size, i)
            if i <= last and not covered(i) and not on_disk:
                run.append(i)
                continue
            if run:
                span = reader.begin_span(self.blob, run[0], run[-1])
                if span is not None:
                    self.nursery.start_soon(self._prefetch_span, span)
                run = []
            if on_disk:
                self._scheduled.add(i)
                self.nursery.start_soon(self._prefetch, i)

    async def _prefetch_span(self, span: _Span) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self.closed:
                    return
                async with self.reader.prefetch_limiter:
                    self.reader.stats.prefetches += len(span.flights)
                    await self.reader.run_span(span)
            except Exception as exc:  # noqa: BLE001 - never let a prefetch end the mount
                # The foreground reads of these chunks will fetch and report them.
                log.debug("prefetch span of %s failed: %s", self.blob.digest, exc)
            finally:
                self._scopes.discard(scope)
                self.reader.release_span(span)  # if it never ran

    async def _prefetch(self, index: int) -> None:
        if self.closed:
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with self.reader.prefetch_limiter:
                    if self.reader.cached_in_memory(self.blob, index):
                        return
                    self.reader.stats.prefetches += 1
                    await self.reader.chunk(self.blob, index)
            except Exception as exc:  # noqa: BLE001 - never let a prefetch end the mount
                # The foreground read of this chunk will fetch and report it.
                log.debug("prefetch of %s chunk %d failed: %s", self.blob.digest, index, exc)
            finally:
                self._scopes.discard(scope)
                self._scheduled.discard(index)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()
        disk = self.reader.disk
        if disk is not None and DiskCache.cacheable(self.blob.digest):
            disk.unpin(self.blob.digest)
