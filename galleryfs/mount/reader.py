"""Chunked, cached, read-ahead reads of registry blobs. No FUSE here.

A blob is read in fixed-size aligned chunks. A chunk comes from, in order: memory or a
load already in flight (chunkcache.py: two readers of one chunk cause one request), the
disk cache (diskstore.py, which checks every chunk it reads back), the registry
(fetch.py, bounded in time). The reader is where these meet; each knows nothing of the
others. What a chunk must hash to is verify.py's (the file's chunk table, or the blob
verified whole first): a chunk from the registry is checked before it is handed to a
reader, kept in memory or owed to the write-behind, and memory is keyed by those
expected digests and the blob's size.

`BlobHandle` is one open file. Its reads tell its read-ahead stream (prefetch.py) where
they are; the stream decides what to fetch ahead and asks the reader for it through a
few questions (the `prefetch.Source` interface). A read that is not part of a stream
loads the smallest units that can be verified. Where the file's chunk table is finer than
the chunk (galleryfs's pushes of files up to a few GiB), those are the table pieces it
touches (pieces.py), and its stream starts only once reads have covered half a chunk in a
row: one tensor costs its pieces, not chunks and read-ahead. Otherwise they are the
chunks it touches (from disk or the registry), loaded into memory, and a fetched one is
written to the disk cache at once (the kernel keeps only the page asked for, so the
write-behind could not get it back). Only under `--verify end`, for a blob without a
table and not on disk, it reads exactly its bytes from the registry, unverified, as
galleryfs did before it verified chunks.

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

from ..errors import DigestMismatch, GalleryError, first_error
from .blob import BlobRef, Chunk, Expect
from .chunkcache import Abandoned, ChunkCache, Flight, Key, Span
from .diskcache import ChunkRejected, DiskCache
from .diskstore import DiskStats, DiskStore
from .fetch import BlobFetch, Fetcher, SpanFetcher, SpanGate
from .pieces import PieceCache, PieceKey, piece_key
from .prefetch import WINDOW_CAP, Prefetcher, Stream
from .verify import STRICT, Verifier

__all__ = ["DEFAULT_CHUNK", "DEFAULT_MEMORY", "WINDOW_CAP", "BlobHandle", "BlobRef",
           "ChunkReader"]

log = logging.getLogger(__name__)

# 8 MiB chunks read faster cold (fewer requests) but, with the read-ahead window, cost
# more of the daemon's peak RSS than 4 MiB (scripts/bench G1, G9); `galleryfs mount`
# passes 4M.
DEFAULT_CHUNK = 4 << 20
# The prefetch window plus the chunk being read and the one before it: a stream drops
# the chunks it has passed from memory (they live on in the kernel's page cache,
# keep_cache, until the write-behind has them on disk), so a larger budget would only
# raise the daemon's RSS.
DEFAULT_MEMORY = WINDOW_CAP + 2 * DEFAULT_CHUNK
# Chunks whose fetched pieces are counted at most (`_count_piece`).
PIECE_COUNTS = 4096
# A span's pieces being hashed while the next is received.
CHECKS_AHEAD = 1
# The longest range a stream asks for at once (claim_span): 16 requests per GiB, where
# the window's claims were 50.
SPAN_REQUEST = 64 << 20


@dataclass
class Warmed:
    """What `warm` did for one file (short keys: the answer travels in an xattr)."""
    chunks: int = 0  # the file's chunks
    fetched: int = 0  # of which came from the registry
    bytes: int = 0  # ... their bytes
    cached: int = 0  # ... already on disk


class NoDiskCache(GalleryError):
    """`warm` on a mount that keeps nothing on disk."""


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
        verify: str = STRICT,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk size must be positive")
        if disk is not None and disk.chunk_size != chunk_size:
            raise ValueError("disk cache and reader disagree on the chunk size")
        self.chunk_size = chunk_size
        self.memory = ChunkCache(memory_bytes)
        self.pieces = PieceCache()
        # (digest, size, chunk index) -> pieces of it fetched outside a stream, oldest
        # first (`_complete_dense`).
        self._piece_counts: dict[tuple[str, int, int], int] = {}
        # Pieces being fetched by a read outside a stream: a read or a chunk that wants
        # one waits for it rather than fetching it again (kernel read-ahead sends
        # neighbouring requests at once).
        self._piece_flights: dict[PieceKey, trio.Event] = {}
        self.fetcher = BlobFetch(fetch, span_fetch, timeout=fetch_timeout)
        self.disk = DiskStore(disk) if disk is not None else None
        self.verify = Verifier(chunk_size, verify, fetch=self.fetcher, disk=self.disk)
        self.prefetcher = Prefetcher(self, spans=span_fetch is not None,
                                     window_cap=window_cap, concurrency=prefetch_concurrency)
        self.stats = ReadStats()
        # The write-behind (writeback.PageCacheFill.owe): told of every chunk fetched
        # from the registry for a blob the disk cache takes. None: such chunks are not
        # cached on disk.
        self.defer: Callable[[BlobRef, int], None] | None = None
        # Mirrors (registry.mirrorranges.MirroredRanges.distrust): told of a blob whose
        # bytes failed their check; True when a mirror served them, so fetching again
        # asks the next source. None: no mirrors, wrong bytes fail the read at once.
        self.distrust: Callable[[str, str], bool] | None = None

    def nchunks(self, blob: BlobRef) -> int:
        return math.ceil(blob.size / self.chunk_size)

    # ---- for the FUSE layer --------------------------------------------------------

    def open(self, blob: BlobRef, nursery: trio.Nursery | None) -> BlobHandle:
        """An open file; its read-ahead runs in `nursery` (None: no read-ahead)."""
        if self.disk is not None:
            self.disk.pin(blob)
        piece = self.verify.piece_size(blob)
        # With pieces, whole chunks and read-ahead wait until reads have covered half a
        # chunk in a row: the kernel's requests for one tensor (mmap read-around and
        # its read-ahead, tuning.py) stay below that.
        stream = self.prefetcher.stream(blob, nursery,
                                        start_run=self.chunk_size // 2 if piece else 0)
        return BlobHandle(self, blob, stream, piece)

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {**self.stats.__dict__, **self.fetcher.stats.__dict__,
                                  **self.verify.stats.__dict__,
                                  "prefetches": self.prefetcher.prefetches}
        # Disk counters are there (as zeros) without a disk cache too.
        out.update(self.disk.snapshot() if self.disk is not None else DiskStats().snapshot())
        out["memory_bytes"] = self.memory.bytes
        out["piece_bytes"] = self.pieces.bytes
        out["memory_limit"] = self.memory.limit
        out["in_flight"] = self.memory.flying
        out["readahead_windows"] = self.prefetcher.windows()
        out["readahead_cap"] = self.prefetcher.window_cap
        return out

    # ---- reads ---------------------------------------------------------------------

    async def read(self, blob: BlobRef, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the blob, short only at its end."""
        return bytes(await self.read_view(blob, offset, size))

    async def read_view(self, blob: BlobRef, offset: int, size: int, *, owe: bool = True
                        ) -> memoryview | bytes:
        """As `read`, without copying when the range lies in one chunk."""
        end = min(blob.size, offset + size)
        if offset >= end:
            return b""
        first = offset // self.chunk_size
        last = (end - 1) // self.chunk_size
        if first == last:
            skip = offset - first * self.chunk_size
            return memoryview(await self.chunk(blob, first, owe=owe))[skip: skip + end - offset]
        found: dict[int, Chunk] = {}

        async def get(i: int) -> None:
            found[i] = await self.chunk(blob, i, owe=owe)

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

    async def read_random(self, blob: BlobRef, start: int, end: int) -> memoryview | bytes:
        """Bytes [start, end) for a read outside any stream: the smallest units that can
        be verified, not owed to the write-behind. Chunks on disk are read from there;
        else the table pieces they touch where the table is finer than the chunk, else
        the chunks. Unverified blobs (`--verify end`, no table): exactly these bytes,
        kept nowhere."""
        cs = self.chunk_size
        if not any(self.on_disk(blob, i) for i in range(start // cs, (end - 1) // cs + 1)):
            if self.verify.trusts_unverified(blob):
                return await self.fetcher.range(blob, start, end)
            piece = self.verify.piece_size(blob)
            if piece:
                data = await self.read_pieces(blob, start, end, piece)
                await self._complete_dense(blob, start, end, piece)
                return data
        return await self.read_view(blob, start, end - start, owe=False)

    async def _complete_dense(self, blob: BlobRef, start: int, end: int, piece: int) -> None:
        """A chunk of which random reads have fetched half the pieces is fetched whole
        (the rest only) and kept on disk: pieces live only in a small memory, so random
        reads all over a file would otherwise fetch it again and again, also after a
        remount. Below half (one tensor among others) the bytes a read costs stay its
        pieces'."""
        if self.disk is None or not self.disk.takes(blob):
            return
        cs = self.chunk_size
        for index in range(start // cs, (end - 1) // cs + 1):
            pieces = -(-(min(blob.size, (index + 1) * cs) - index * cs) // piece)
            key = (blob.digest, blob.size, index)
            if 2 * self._piece_counts.get(key, 0) >= pieces and not self.on_disk(blob, index):
                self._piece_counts.pop(key, None)
                await self.chunk(blob, index, owe=False)

    def _count_piece(self, blob: BlobRef, index: int) -> None:
        """One more piece of chunk `index` fetched by a read outside a stream (counted
        whether or not it is still in memory: the small piece memory evicts)."""
        key = (blob.digest, blob.size, index)
        counts = self._piece_counts
        counts[key] = counts.pop(key, 0) + 1
        while len(counts) > PIECE_COUNTS:
            del counts[next(iter(counts))]

    async def read_pieces(self, blob: BlobRef, start: int, end: int, piece: int
                          ) -> memoryview | bytes:
        """Bytes [start, end) from the table pieces they touch: those held in memory,
        the others fetched (one request per run of them), checked and kept."""
        first, last = start // piece, (end - 1) // piece
        expect = self.verify.pieces_expect(blob, first, last)
        keys = [piece_key(blob, expect, first, i) for i in range(first, last + 1)]
        flights = self._piece_flights
        parts: list[memoryview] = []
        i = 0
        while i < len(keys):
            held = self.pieces.get(keys[i])
            if held is not None:
                parts.append(held)
                i += 1
                continue
            flight = flights.get(keys[i])
            if flight is not None:
                await flight.wait()
                if keys[i] in self.pieces:
                    continue
                # That fetch failed (or the piece left memory since): fetched here.
            j = i
            while (j + 1 < len(keys) and keys[j + 1] not in self.pieces
                   and keys[j + 1] not in flights):
                j += 1
            done = trio.Event()
            for k in range(i, j + 1):
                flights[keys[k]] = done
            try:
                data = memoryview(await self._fetch_pieces(blob, first + i, first + j, piece))
                for k in range(i, j + 1):
                    part = data[(k - i) * piece:(k - i + 1) * piece]
                    self.pieces.put(keys[k], part)
                    parts.append(part)
                    self._count_piece(blob, (first + k) * piece // self.chunk_size)
            finally:
                for k in range(i, j + 1):
                    if flights.get(keys[k]) is done:
                        del flights[keys[k]]
                done.set()
            i = j + 1
        base = first * piece
        if len(parts) == 1:
            return parts[0][start - base:end - base]
        return memoryview(b"".join(parts))[start - base:end - base]

    async def _fetch_pieces(self, blob: BlobRef, first: int, last: int, piece: int) -> Chunk:
        """Table pieces first..last from the registry in one request, checked (hashed
        by the receiving thread where it can); fetched again while a mirror can be
        blamed. The origin's wrong bytes fail."""
        verify = self.verify
        expect = verify.pieces_expect(blob, first, last)
        start, end = first * piece, min(blob.size, (last + 1) * piece)
        while True:
            data, sums = await self.fetcher.hashed(blob, start, end, piece)
            if await verify.holds(data, expect, sums):
                verify.stats.verified_pieces += last - first + 1
                return data
            if self.distrust is None or not self.distrust(
                    blob.digest, f"bytes {start}-{end} do not match their table pieces"):
                raise verify.mismatch(blob, start // self.chunk_size,
                                      f" (table pieces {first}-{last})")

    async def _fetch_chunk(self, blob: BlobRef, index: int, expect: Expect | None
                           ) -> tuple[Chunk, bytes | None]:
        """Chunk `index` from the registry, with the sha256 per table piece where the
        receiving thread hashed them. Pieces of it that reads outside a stream left in
        memory (checked then) are taken from there and only the rest is fetched: a
        stream that starts where such reads were fetches no byte twice."""
        cs = self.chunk_size
        start, end = index * cs, min(blob.size, (index + 1) * cs)
        unit = expect.piece if expect is not None else 0
        if expect is None or unit >= cs or not (len(self.pieces) or self._piece_flights):
            return await self.fetcher.hashed(blob, start, end, unit)
        first = start // unit
        keys = [piece_key(blob, expect, first, first + k)
                for k in range(-(-(end - start) // unit))]
        for key in keys:
            flight = self._piece_flights.get(key)
            if flight is not None:
                await flight.wait()
        held = [self.pieces.get(key) for key in keys]
        if all(p is None for p in held):
            return await self.fetcher.hashed(blob, start, end, unit)
        out = bytearray(end - start)
        sums: list[bytes] | None = []
        k = 0
        while k < len(keys):
            got = held[k]
            if got is not None:
                out[k * unit:k * unit + len(got)] = got
                if sums is not None:
                    sums.append(keys[k][4])  # its digest: it was checked against it
                k += 1
                continue
            m = k
            while m + 1 < len(keys) and held[m + 1] is None:
                m += 1
            lo, hi = start + k * unit, min(end, start + (m + 1) * unit)
            data, got_sums = await self.fetcher.hashed(blob, lo, hi, unit)
            out[lo - start:hi - start] = data
            if sums is not None and got_sums is not None:
                sums.append(got_sums)
            else:
                sums = None  # hashed whole by the caller
            k = m + 1
        for key in keys:
            self.pieces.pop(key)
        return out, b"".join(sums) if sums is not None else None

    def key(self, blob: BlobRef, index: int) -> Key:
        return (blob.digest, blob.size, index, self.verify.expect(blob, index))

    async def chunk(self, blob: BlobRef, index: int, *, owe: bool = True) -> Chunk:
        """The chunk's bytes, verified, from memory, a load in flight, disk or the
        registry. Under `--verify strict`, the first chunk of a blob without a table
        waits for the whole blob to be verified."""
        verify = self.verify
        while verify.pending(blob):
            try:
                await verify.prepare(blob)
            except DigestMismatch:
                if self.distrust is None or not self.distrust(blob.digest, "wrong blob digest"):
                    raise
        expect = verify.expect(blob, index)
        key = (blob.digest, blob.size, index, expect)
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
            data = (await self.disk.read_chunk(blob, index, expect) if self.disk is not None
                    else None)
            if data is None:
                # Hashed by the thread that receives it where it can be (a direct read).
                data, sums = await self._fetch_chunk(blob, index, expect)
                if expect is not None:
                    data = await self._checked(blob, index, data, expect, sums)
                fetched = True
        except trio.Cancelled:
            memory.fail(key, flight, Abandoned())
            raise
        except BaseException as exc:
            memory.fail(key, flight, exc)
            raise
        memory.settle(key, flight, data)
        if fetched and owe:
            self._owe(blob, index)
        elif fetched and expect is not None and self.disk is not None and self.disk.takes(blob):
            # A random read's chunk: the kernel keeps only the page asked for, so the
            # write-behind could not get it back. Kept on disk now (it was verified), or
            # each later read near it fetches the whole chunk again.
            await self.store(blob, index, data, checked=True)
        return data

    async def _checked(self, blob: BlobRef, index: int, data: Chunk, expect: Expect,
                       sums: bytes | None = None) -> Chunk:
        """The fetched chunk if it matches (`sums`: its sha256 per `expect.piece` bytes,
        hashed by the thread that received it, else hashed now); fetched again while a
        mirror that served the blob can be blamed (it is skipped from now on). The
        origin's wrong bytes fail."""
        verify = self.verify
        while not await verify.holds(data, expect, sums):
            if self.distrust is None or not self.distrust(
                    blob.digest, f"chunk {index} does not match its digest"):
                raise verify.mismatch(blob, index)
            start = index * self.chunk_size
            data, sums = await self.fetcher.hashed(
                blob, start, min(blob.size, start + self.chunk_size), expect.piece)
        verify.stats.verified_chunks += 1
        return data

    def _owe(self, blob: BlobRef, index: int) -> None:
        if self.defer is not None and self.disk is not None and self.disk.takes(blob):
            self.defer(blob, index)

    async def warm(self, blob: BlobRef) -> Warmed:
        """Every chunk of the blob into the disk cache, verified, one at a time (the
        caller bounds how many files warm at once). Pinned meanwhile, so its own chunks
        are not evicted for each other."""
        if self.disk is None or not self.disk.takes(blob):
            raise NoDiskCache(f"{blob}: this mount keeps nothing on disk (--cache-size 0)")
        done = Warmed(chunks=self.nchunks(blob))
        self.disk.pin(blob)
        try:
            for index in range(done.chunks):
                if self.on_disk(blob, index):
                    done.cached += 1
                    continue
                held = self.in_memory(blob, index)
                data = await self.chunk(blob, index, owe=False)
                if not held:
                    done.fetched += 1
                    done.bytes += len(data)
                if not self.on_disk(blob, index):  # it was in memory: not written yet
                    await self.store(blob, index, data, checked=True)
        finally:
            self.disk.unpin(blob)
        return done

    # ---- for read-ahead (prefetch.Source) ------------------------------------------

    def at_hand(self, blob: BlobRef, index: int) -> bool:
        return self.memory.at_hand(self.key(blob, index))

    def in_memory(self, blob: BlobRef, index: int) -> bool:
        return self.memory.holds(self.key(blob, index))

    def on_disk(self, blob: BlobRef, index: int) -> bool:
        return self.disk is not None and self.disk.has(blob, index)

    def claim_span(self, blob: BlobRef, first: int, last: int, *, gated: bool = False
                   ) -> Span | None:
        """Claim chunks first..last for one range request (a read-ahead stream): from
        now on readers of them wait for it rather than fetch them themselves.

        The registry spends far less CPU per byte on a few long ranges than on many
        chunk-sized ones (scripts/bench G1). Chunks already in memory, in flight or on
        disk are not claimed: the span ends before the first of them. Run the result
        with `fetch_span`, which always releases what it did not deliver. `gated`: a
        stream's span, whose request runs on as `extend_span` claims more (SpanGate).
        """
        if not self.fetcher.spans or self.verify.pending(blob):
            # A blob to verify whole first: its foreground read does that.
            return None
        flights = self._claim(blob, first, last)
        if not flights:
            return None
        cs = self.chunk_size
        after = first + len(flights)
        claimed = min(blob.size, after * cs)
        if not gated:
            return Span(blob, flights, after, None, claimed)
        # One request for as much of the stream as it will claim, up to SPAN_REQUEST: a
        # proxy that buffers answers (nginx by default) reads that much from the
        # registry even when the stream stops early.
        stop = min(blob.size, max(claimed, (first + SPAN_REQUEST // cs) * cs))
        return Span(blob, flights, after, SpanGate(claimed), stop)

    def extend_span(self, span: Span, first: int, last: int) -> int:
        """Claim chunks first..last for a gated span whose request is still running and
        has claimed up to `first`: how many it took (0: start another span)."""
        cs = self.chunk_size
        if span.gate is None or span.next != first or span.gate.shut or first * cs >= span.stop:
            return 0
        flights = self._claim(span.blob, first, min(last, (span.stop - 1) // cs))
        if not flights:
            return 0
        after = first + len(flights)
        if not span.gate.extend(min(span.stop, after * cs)):
            for key, flight in flights.values():  # its request ended meanwhile
                self.memory.fail(key, flight, Abandoned())
            return 0
        span.flights.update(flights)
        span.next = after
        return len(flights)

    def _claim(self, blob: BlobRef, first: int, last: int) -> dict[int, tuple[Key, Flight]]:
        disk = self.disk if self.disk is not None and self.disk.takes(blob) else None
        memory = self.memory
        flights = {}
        for i in range(first, last + 1):
            key = self.key(blob, i)
            if memory.at_hand(key) or disk is not None and disk.has(blob, i):
                break
            flights[i] = (key, memory.claim(key))
        return flights

    async def fetch_span(self, span: Span) -> None:
        blob, flights, cs, memory = span.blob, span.flights, self.chunk_size, self.memory
        first = next(iter(flights))
        end = span.stop
        verify = self.verify
        # The receiving thread hashes each piece as it arrives, per the table's piece
        # size: here its digests are only compared (scripts/bench G1: a trip to a hashing
        # thread per chunk, and the receiving thread waiting for it, cost more).
        expected = flights[first][0][3]
        unit = expected.piece if expected is not None else 0
        # Pieces received without digests (through httpx) and not yet checked: the next
        # one is received while one is hashed, and no more (memory stays within the
        # read-ahead window's).
        unchecked = trio.Semaphore(CHECKS_AHEAD)

        async def check(index: int, data: bytearray, expect: Expect) -> None:
            try:
                ok = await verify.matches(data, expect)
            finally:
                unchecked.release()
            settle(index, data, ok)

        def settle(index: int, data: bytearray, ok: bool) -> None:
            if ok:
                verify.stats.verified_chunks += 1
                if memory.deliver(span, index, data):
                    self._owe(blob, index)
            else:
                # Left to the reader that wants it: it fetches again, and if the bytes
                # are still wrong, its read fails with one warning. The stream's request
                # ends at what it claimed: its source lied once.
                log.debug("%s: prefetched chunk %d failed its check", blob, index)
                memory.abandon(span, index)
                if span.gate is not None:
                    span.gate.close()

        async def take(offset: int, data: bytearray, sums: bytes | None) -> bool:
            index = offset // cs
            claimed = flights.get(index)
            if claimed is None:
                return False  # given up meanwhile
            if len(data) != min(cs, blob.size - offset):
                memory.abandon(span, index)
                return False
            expect = claimed[0][3]
            if expect is None:  # --verify end, no table
                if memory.deliver(span, index, data):
                    self._owe(blob, index)
            elif sums is not None:
                settle(index, data, expect.agrees(len(data), unit, sums))
            else:
                # Checked beside the stream: the next piece is received meanwhile.
                await unchecked.acquire()
                checks.start_soon(check, index, data, expect)
            return True

        try:
            async with trio.open_nursery() as checks:
                await self.fetcher.span(blob, first * cs, end, cs, take, unit, span.gate)
        finally:
            if span.gate is not None:
                span.gate.close()
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
            key = self.key(blob, i)
            if self.memory.in_flight(key):
                continue
            self.memory.drop(key)
            reached = i + 1
        return reached

    # ---- for the write-behind (writeback.Source) -----------------------------------

    def held(self, blob: BlobRef, index: int) -> Chunk | None:
        return self.memory.get(self.key(blob, index))

    async def store(self, blob: BlobRef, index: int, data: Chunk, *, checked: bool = False
                    ) -> None:
        """Write a chunk to the disk cache now, if it hashes to what it must (checked in
        the writing thread; `checked`: these bytes were verified, in memory since). A
        chunk that does not is counted and logged, not written; a blob that fails its
        digest once complete is dropped from disk and memory (later reads fetch it
        again) and logged. Neither is raised."""
        if self.disk is None:
            return
        expect = self.verify.expect(blob, index)
        if expect is None and self.verify.strict:
            return  # nothing to check it against (cannot happen: it was served)
        try:
            await self.disk.write(blob, index, data, expect, checked=checked)
        except ChunkRejected:
            self.verify.mismatch(blob, index, " on its way to the disk cache")
        except DigestMismatch as exc:
            self.memory.drop_blob(blob.digest, blob.size)
            log.warning("%s", exc)


class BlobHandle:
    """One open file: reads through the ChunkReader, its stream reading ahead."""

    def __init__(self, reader: ChunkReader, blob: BlobRef, stream: Stream, piece: int = 0
                 ) -> None:
        self.reader = reader
        self.blob = blob
        self.stream = stream
        # The table piece when it is finer than the chunk (reads outside a stream fetch
        # pieces), else 0.
        self.piece = piece
        self.readahead = stream.readahead
        self.closed = False

    async def read(self, offset: int, size: int) -> memoryview | bytes:
        reader = self.reader
        end = min(self.blob.size, offset + size)
        if offset >= end or not reader.verify.pending(self.blob) and all(
                reader.in_memory(self.blob, i) for i in range(
                    offset // reader.chunk_size, (end - 1) // reader.chunk_size + 1)):
            return await self._read(offset, size)  # nothing to wait for (most reads)
        # One deadline for the whole read, however many fetches, checks and waits on
        # other tasks' fetches it takes: --timeout without its blob's bytes moving.
        with reader.fetcher.waiting(self.blob, offset, size):
            return await self._read(offset, size)

    async def _read(self, offset: int, size: int) -> memoryview | bytes:
        window = self.readahead.observe(offset, size)
        reader = self.reader
        end = min(self.blob.size, offset + size)
        if (not window and (offset != 0 or self.piece) and offset < end
                and not any(reader.at_hand(self.blob, i) for i in range(
                    offset // reader.chunk_size, (end - 1) // reader.chunk_size + 1))):
            # Not a stream, and no chunk in memory: no read-ahead, and nothing owed to
            # the write-behind. Offset 0 is taken as the start of a stream unless pieces
            # can be read (a safetensors header is read there, then maybe one tensor).
            return await reader.read_random(self.blob, offset, end)
        data = await reader.read_view(self.blob, offset, size)
        self.stream.served(offset, offset + len(data))
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
