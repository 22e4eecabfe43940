"""Read-ahead: what to fetch before it is asked for, and when.

`ReadAhead` is the pure window logic of one open file: when reads are sequential, the
window starts at one chunk and doubles up to a cap for every chunk consumed. A file read
in table pieces outside a stream (reader.py) starts its stream only once reads have
covered a run of bytes in a row (half a chunk): the mmap read-around and kernel
read-ahead of one tensor are a few contiguous requests too, and a stream would turn them
into whole chunks and a window. Kernel
readahead and mmap faults arrive slightly out of order, so a forward skip of a few chunks
or a step back of a quarter chunk does not break a stream (as in Mountpoint for S3).

`Stream` acts on it for one open file. With span fetches, the window is refilled when
less than half of it is at hand, the gap claimed at once; the stream's range request
(up to 64 MiB) takes each refill as it comes (SpanGate, fetch.py), so a stream costs the
registry one request where it cost one per refill; without spans, chunk by chunk.
Chunks the stream has passed are dropped from memory.
`Prefetcher` holds what the streams share: how many prefetches run at once, the cap.

Neither touches a cache: they ask a `Source` (the ChunkReader) a few questions, such as
"is chunk i at hand?", "claim chunks i..j for one request", "drop what lies behind".
"""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

import trio

from ..registry.ranges import make_room
from .blob import BlobRef, Chunk
from .chunkcache import Span

log = logging.getLogger(__name__)

WINDOW_CAP = 32 << 20
# Stream tolerances: a forward skip of 16 MiB (at least two chunks) and a step back of
# a quarter chunk keep a running stream going (as in Mountpoint for S3).
SEQ_FORWARD = 16 << 20
SEQ_BACK_FRACTION = 4
# Starting a stream takes a read that continues the previous one (within a page): with
# the running-stream tolerances, one random 4 KiB read in ~60 over a GiB would look
# sequential and cost a whole chunk of read-ahead.
SEQ_START_SLACK = 4096
# A chunk is dropped behind a stream once every byte of it has been returned to the
# kernel (then the page cache holds it) and the stream is a chunk past it (the memory
# budget has room for that chunk: serve.py); one the reads skipped part of, this far
# behind.
# The kernel sends read-ahead requests asynchronously (up to max_background of them, of
# up to 1 MiB) and they are answered out of order: dropped at the first read past it, a
# chunk was fetched again for the requests still to come (cat of a 12 MiB file: 1.17×
# its bytes from the registry with 1 MiB chunks).
DROP_LAG = SEQ_FORWARD


class Source(Protocol):
    """What read-ahead asks of the reader."""

    chunk_size: int

    def nchunks(self, blob: BlobRef) -> int: ...

    def at_hand(self, blob: BlobRef, index: int) -> bool:
        """In memory or on its way there."""
        ...

    def in_memory(self, blob: BlobRef, index: int) -> bool: ...

    def on_disk(self, blob: BlobRef, index: int) -> bool: ...

    async def chunk(self, blob: BlobRef, index: int) -> Chunk:
        """Load the chunk into memory, from wherever it is."""
        ...

    def claim_span(self, blob: BlobRef, first: int, last: int, *, gated: bool = False
                   ) -> Span | None:
        """Claim chunks first.. up to last (or the first at hand or on disk) for one
        request; None when there is nothing to claim. `gated`: the request may go on
        with `extend_span`."""
        ...

    def extend_span(self, span: Span, first: int, last: int) -> int:
        """Claim chunks first.. up to last for a running gated span that has claimed up
        to `first`; how many (0: it cannot take them)."""
        ...

    async def fetch_span(self, span: Span) -> None:
        """Fetch a claimed span; always releases what it did not deliver."""
        ...

    def release_span(self, span: Span) -> None: ...

    def drop_behind(self, blob: BlobRef, start: int, end: int) -> int:
        """Drop chunks [start, end) from memory where that costs no refetch; returns the
        index below which all are gone."""
        ...


class ReadAhead:
    """Sequential-access detection and window sizing for one open file (pure logic)."""

    def __init__(self, chunk_size: int, cap: int = WINDOW_CAP, start_run: int = 0) -> None:
        self.chunk_size = chunk_size
        self.cap = max(cap, chunk_size)
        # Bytes read in a row before a stream starts; 0: the second read in a row.
        self.start_run = start_run
        self.window = 0
        self.run_start = 0
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
                self.last_end = max(self.last_end, end)
                if self.last_end - self.run_start < self.start_run:
                    return 0
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
            self.run_start = offset
        return self.window


class Prefetcher:
    """What the streams of all open files share."""

    def __init__(self, source: Source, *, spans: bool, window_cap: int = WINDOW_CAP,
                 concurrency: int = 2) -> None:
        self.source = source
        self.spans = spans
        self.window_cap = window_cap
        self.limiter = trio.CapacityLimiter(concurrency)
        self.prefetches = 0  # chunks prefetched (claimed in a span, or loaded alone)
        # Spans holding a slot, oldest first.
        self.holding: dict[Span, None] = {}
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()

    def stream(self, blob: BlobRef, nursery: trio.Nursery | None, *, start_run: int = 0
               ) -> Stream:
        """Read-ahead for one open file; prefetches run in `nursery` (None: never).
        `start_run`: bytes to read in a row before it starts (ReadAhead)."""
        stream = Stream(self, blob, nursery, start_run)
        self._streams.add(stream)
        return stream

    def make_room(self) -> None:
        """A span is about to wait for a prefetch slot: the other streams' running
        requests end at what they have claimed (their streams start new ones, queued
        like this one), so one stream's request cannot hold a slot for a whole file
        while another stream waits."""
        make_room(self.limiter, (held.gate for held in self.holding))

    def windows(self) -> list[int]:
        """The read-ahead window of every open file, in bytes."""
        return sorted((s.readahead.window for s in self._streams if not s.closed),
                      reverse=True)


class Stream:
    def __init__(self, prefetcher: Prefetcher, blob: BlobRef,
                 nursery: trio.Nursery | None, start_run: int = 0) -> None:
        self.prefetcher = prefetcher
        self.source = prefetcher.source
        self.blob = blob
        self.nursery = nursery
        self.readahead = ReadAhead(self.source.chunk_size, prefetcher.window_cap, start_run)
        self.closed = False
        self._scopes: set[trio.CancelScope] = set()
        self._scheduled: set[int] = set()
        self._dropped = 0  # chunks below this index were dropped behind the stream
        # Chunk index -> the ranges of it (merged) returned to the kernel, for chunks
        # not yet wholly returned.
        self._served: dict[int, list[tuple[int, int]]] = {}
        # Chunks returned whole: the kernel holds them, read-ahead skips them (mmap
        # faults read around, back and forth: one it dropped was fetched again).
        self._returned: set[int] = set()
        # Returned whole but kept until the stream is a chunk past them: pages the
        # kernel read ahead can be reclaimed before its reader gets to them (DAMON on
        # these VMs, memory pressure), and it asks again (sha256sum of 1 GiB: 1.02×).
        self._kept: set[int] = set()
        self._front = 0  # the furthest end of a read returned
        # The stream's latest span: its request runs on while reads keep up (SpanGate).
        self._span: Span | None = None

    def served(self, start: int, end: int) -> None:
        """A read returned bytes [start, end) to the kernel: a chunk all of whose bytes
        it now holds leaves memory (drop-behind, `advance`)."""
        cs = self.source.chunk_size
        if start + 2 * cs < self._front:
            # A new pass (a jump back by more than read-around does: an epoch, a re-read
            # after the kernel dropped the pages): what it held of the last pass it may
            # have dropped since, so read-ahead must not skip those chunks.
            self._returned.clear()
            self._served.clear()
            self._kept.clear()
            self._front = 0
            self._dropped = min(self._dropped, start // cs)
        self._front = max(self._front, end)
        for i in range(start // cs, (max(start, end) - 1) // cs + 1):
            base = i * cs
            length = min(cs, self.blob.size - base)
            merged: list[tuple[int, int]] = []
            for lo, hi in sorted([*self._served.get(i, []),
                                  (max(start, base) - base, min(end, base + length) - base)]):
                if merged and lo <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
                else:
                    merged.append((lo, hi))
            if merged == [(0, length)]:
                self._served.pop(i, None)
                self._returned.add(i)
                if i >= self._dropped:
                    self._kept.add(i)
            else:
                self._served[i] = merged
        for i in [i for i in self._kept if (i + 2) * cs <= self._front]:
            self._kept.discard(i)
            self.source.drop_behind(self.blob, i, i + 1)

    def advance(self, pos: int, window: int) -> None:
        """A read ended at `pos` with `window` bytes wanted ahead of it."""
        if self.nursery is None or self.closed:
            return
        source, blob, nursery = self.source, self.blob, self.nursery
        # Reads are answered out of order: a read that ends behind a later one (the
        # stream's furthest, reset by a jump) must not fetch again what that one's
        # reader already returned and dropped.
        pos = max(pos, self.readahead.last_end or 0)
        # At the end of the blob nothing is left to fetch (its last chunk, returned in
        # full, may have been dropped already).
        first = pos // source.chunk_size if pos < blob.size else source.nchunks(blob)
        last = min(source.nchunks(blob) - 1, (pos + window - 1) // source.chunk_size)
        # Forget what lies behind the stream so the set stays small.
        self._scheduled = {i for i in self._scheduled if i >= first}
        # Drop behind: chunks the stream has passed leave memory, once the kernel's
        # page cache holds them (`served`), which keeps them until the write-behind has
        # them on disk: kept here, two streams' passed chunks pushed each other's
        # read-ahead out of memory, and a third of two 1 GiB reads was fetched twice.
        far = max(0, pos - DROP_LAG) // source.chunk_size
        if far > self._dropped:
            self._dropped = source.drop_behind(blob, self._dropped, far)
            self._served = {i: m for i, m in self._served.items() if i >= self._dropped}
            self._kept = {i for i in self._kept if i >= self._dropped}

        def covered(i: int) -> bool:
            return i in self._scheduled or i in self._returned or source.at_hand(blob, i)

        if not self.prefetcher.spans:
            for i in range(first, last + 1):
                if not covered(i):
                    self._scheduled.add(i)
                    nursery.start_soon(self._prefetch, i)
            return
        # Refill only when less than half the window is at hand or on its way, then in
        # long spans: fewer, longer requests.
        ahead = 0
        while first + ahead <= last and covered(first + ahead):
            ahead += 1
        if ahead and 2 * ahead >= last - first + 1:
            return
        run: list[int] = []
        for i in range(first, last + 2):
            on_disk = i <= last and not covered(i) and source.on_disk(blob, i)
            if i <= last and not covered(i) and not on_disk:
                run.append(i)
                continue
            if run:
                # The stream's running request takes the run if it reaches it (one
                # request for the whole stream); otherwise a new one starts.
                live = self._span
                if live is None or not source.extend_span(live, run[0], run[-1]):
                    span = source.claim_span(blob, run[0], run[-1], gated=True)
                    if span is not None:
                        if live is not None and live.gate is not None:
                            live.gate.close()  # it ends where it is, not after waiting
                        self._span = span
                        nursery.start_soon(self._prefetch_span, span)
                run = []
            if on_disk:
                self._scheduled.add(i)
                nursery.start_soon(self._prefetch, i)

    async def _prefetch_span(self, span: Span) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self.closed:
                    return
                self.prefetcher.make_room()
                async with self.prefetcher.limiter:
                    self.prefetcher.prefetches += len(span.flights)
                    self.prefetcher.holding[span] = None
                    try:
                        await self.source.fetch_span(span)
                    finally:
                        self.prefetcher.holding.pop(span, None)
            except Exception as exc:  # noqa: BLE001 - never let a prefetch end the mount
                # The foreground reads of these chunks will fetch and report them.
                log.debug("prefetch span of %s failed: %s", self.blob.digest, exc)
            finally:
                self._scopes.discard(scope)
                self.source.release_span(span)  # if it never ran

    async def _prefetch(self, index: int) -> None:
        if self.closed:
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with self.prefetcher.limiter:
                    if self.source.in_memory(self.blob, index):
                        return
                    self.prefetcher.prefetches += 1
                    await self.source.chunk(self.blob, index)
            except Exception as exc:  # noqa: BLE001 - never let a prefetch end the mount
                # The foreground read of this chunk will fetch and report it.
                log.debug("prefetch of %s chunk %d failed: %s", self.blob.digest, index, exc)
            finally:
                self._scopes.discard(scope)
                self._scheduled.discard(index)

    def close(self) -> None:
        """Stop: prefetches of this file are cancelled (their claims released)."""
        if self.closed:
            return
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()
