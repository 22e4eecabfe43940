"""Chunks in memory, and chunks on their way there.

The memory side is an LRU bounded in bytes. A *flight* is a claim on a chunk being
loaded: whoever wants a chunk that is in flight waits for it instead of loading it again,
so two readers of one chunk cause one request. A `Span` claims a run of chunks at once,
for one range request that delivers them one by one. Nothing here fetches, or knows where
a chunk comes from: that is the reader's business.

Keys are (blob digest, blob size, chunk index, expected digests): two files (or
revisions) with the same blob and the same table share their chunks, while a revision
that claims another size or table for a digest can neither find nor shadow the bytes
another revision reads (README, Security and integrity). Only verified chunks (or, under
`--verify end` without a table, chunks of the right length) are ever put here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cachetools
import trio

from .blob import BlobRef, Chunk, Expect
from .fetch import SpanGate

Key = tuple[str, int, int, Expect | None]


class Abandoned(Exception):
    """The load a reader waited on was given up (a closed file's prefetch, a span that
    ended early): the reader loads the chunk itself."""


@dataclass
class Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: Chunk | None = None
    error: BaseException | None = None

    async def wait(self) -> Chunk | None:
        """The chunk; None when its loader gave it up; the loader's error otherwise."""
        await self.done.wait()
        if self.data is not None:
            return self.data
        if isinstance(self.error, Abandoned):
            return None
        assert self.error is not None
        raise self.error


@dataclass(eq=False)  # compared and hashed by identity (Prefetcher.holding)
class Span:
    """Chunks claimed for one range request, by index, contiguous; emptied as they are
    delivered or released. A stream's span may claim more as it goes (`gate`): `next`
    is the index after the last one claimed, `stop` the end of its request (bytes)."""

    blob: BlobRef
    flights: dict[int, tuple[Key, Flight]]
    next: int = 0
    gate: SpanGate | None = None
    stop: int = 0


class ChunkCache:
    get: Callable[[Key], Chunk | None]

    def __init__(self, max_bytes: int) -> None:
        self._lru: cachetools.LRUCache[Key, Chunk] = cachetools.LRUCache(
            maxsize=max_bytes, getsizeof=len)
        self._flights: dict[Key, Flight] = {}
        # Looked up on every read: the LRU's own method, without a call in between.
        self.get = self._lru.get

    @property
    def bytes(self) -> int:
        return int(self._lru.currsize)

    @property
    def limit(self) -> int:
        return int(self._lru.maxsize)

    @property
    def flying(self) -> int:
        return len(self._flights)

    def __len__(self) -> int:
        return len(self._lru)

    def holds(self, key: Key) -> bool:
        return key in self._lru

    def in_flight(self, key: Key) -> bool:
        return key in self._flights

    def at_hand(self, key: Key) -> bool:
        """In memory, or on its way there."""
        return key in self._lru or key in self._flights

    def put(self, key: Key, data: Chunk) -> None:
        try:
            self._lru[key] = data
        except ValueError:  # a chunk larger than the whole memory budget
            pass

    def drop(self, key: Key) -> None:
        self._lru.pop(key, None)

    def drop_blob(self, digest: str, size: int) -> None:
        for key in [k for k in self._lru if k[0] == digest and k[1] == size]:
            self._lru.pop(key, None)

    def clear(self) -> None:
        self._lru.clear()

    # ---- flights -----------------------------------------------------------------

    def flight(self, key: Key) -> Flight | None:
        return self._flights.get(key)

    def claim(self, key: Key) -> Flight:
        """Announce a load of the chunk: end it with `settle` or `fail`, always."""
        flight = self._flights[key] = Flight()
        return flight

    def settle(self, key: Key, flight: Flight, data: Chunk) -> None:
        """The load succeeded: the chunk goes to memory and to everyone waiting."""
        flight.data = data
        self.put(key, data)
        self._flights.pop(key, None)
        flight.done.set()

    def fail(self, key: Key, flight: Flight, error: BaseException) -> None:
        """The load failed (`Abandoned`: was given up); the waiting readers learn it."""
        flight.error = error
        self._flights.pop(key, None)
        flight.done.set()

    def deliver(self, span: Span, index: int, data: Chunk) -> bool:
        """Settle chunk `index` of the span; False when it was released meanwhile."""
        claimed = span.flights.pop(index, None)
        if claimed is None:
            return False
        self.settle(claimed[0], claimed[1], data)
        return True

    def abandon(self, span: Span, index: int) -> None:
        """Give up one chunk of the span: its readers load it themselves."""
        claimed = span.flights.pop(index, None)
        if claimed is not None:
            self.fail(claimed[0], claimed[1], Abandoned())

    def release(self, span: Span) -> None:
        """Give up what the span did not deliver: its readers load those chunks."""
        for key, flight in span.flights.values():
            self.fail(key, flight, Abandoned())
        span.flights.clear()
