"""Blob bytes from the registry for the mount: bounded in time, checked in length, counted.
What they must hash to is verify.py's business, checked before anyone sees them.

Every network fetch of the data path goes through `BlobFetch`, so a dead registry turns
into an error rather than a hang, and a blob the registry lost turns into `BlobMissing`:
a file the listing shows but whose bytes are gone is damage (EIO), not absence (ENOENT).

Two shapes: `range`, exactly bytes [start, end) in one buffer; and `span`, one request
for a run of chunks handed over chunk by chunk as they arrive (the registry spends far
less CPU per byte on a few long ranges than on many chunk-sized ones).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import trio

from ..errors import BlobMissing, NotFound, RegistryUnavailable
from .blob import BlobRef, Chunk

# (repo, digest, start, end) -> exactly bytes [start, end)
Fetcher = Callable[[str, str, int, int], Awaitable[Chunk]]
# (offset, bytes, sums) of one piece of a span, handed over as it arrives; sums: the raw
# sha256 of each `unit` bytes of the piece, hashed by the thread that received it, or
# None (not hashed: the taker hashes it)
Deliver = Callable[[int, bytearray, bytes | None], Awaitable[None]]
# (repo, digest, start, end, piece size, deliver, unit): bytes [start, end) with one
# request, delivered piece by piece in order, digested per `unit` bytes (0: not);
# returns the offset reached (end unless it failed)
SpanFetcher = Callable[[str, str, int, int, int, Deliver, int], Awaitable[int]]
# A span's piece for its taker: False when it was no longer wanted (not counted). The
# next piece is received meanwhile only if it returns before checking the piece.
Take = Callable[[int, bytearray, bytes | None], Awaitable[bool]]


@dataclass
class FetchStats:
    fetches: int = 0  # chunks or exact ranges received (and wanted)
    fetched_bytes: int = 0
    spans: int = 0  # span requests started


class BlobFetch:
    def __init__(self, fetch: Fetcher, span_fetch: SpanFetcher | None = None, *,
                 timeout: float = 60.0) -> None:
        self.fetch = fetch
        self.span_fetch = span_fetch
        self.timeout = timeout
        self.stats = FetchStats()

    @property
    def spans(self) -> bool:
        return self.span_fetch is not None

    async def range(self, blob: BlobRef, start: int, end: int) -> Chunk:
        """Bytes [start, end) of the blob, straight from the registry."""
        try:
            with trio.move_on_after(self.timeout) as scope:
                data = await self.fetch(blob.repo, blob.digest, start, end)
        except NotFound as exc:
            _missing(blob, exc)
        if scope.cancelled_caught:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: no data within {self.timeout:g}s")
        if len(data) != end - start:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: got {len(data)} bytes for a {end - start} byte range")
        self.stats.fetches += 1
        self.stats.fetched_bytes += len(data)
        return data

    async def hashed(self, blob: BlobRef, start: int, end: int, unit: int
                     ) -> tuple[Chunk, bytes | None]:
        """As `range`, and the sha256 of each `unit` bytes where the thread that received
        them hashed them (a span of one piece), else None: the caller hashes them."""
        if self.span_fetch is None or not unit:
            return await self.range(blob, start, end), None
        got: list[tuple[bytearray, bytes | None]] = []

        async def deliver(offset: int, data: bytearray, sums: bytes | None) -> None:
            got.append((data, sums))

        try:
            with trio.move_on_after(self.timeout) as scope:
                await self.span_fetch(blob.repo, blob.digest, start, end, end - start, deliver,
                                      unit)
        except NotFound as exc:
            _missing(blob, exc)
        if scope.cancelled_caught:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: no data within {self.timeout:g}s")
        if len(got) != 1 or len(got[0][0]) != end - start:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: got {sum(len(d) for d, _ in got)} bytes in "
                f"{len(got)} pieces for a {end - start} byte range")
        self.stats.fetches += 1
        self.stats.fetched_bytes += end - start
        return got[0]

    async def span(self, blob: BlobRef, start: int, end: int, piece: int, take: Take,
                   unit: int = 0) -> None:
        """Bytes [start, end) with one request, handed to `take` `piece` bytes at a time
        (with their sha256 per `unit` bytes where the receiving thread hashed them).
        Returns early, without an error, on a timeout (a piece's time for every piece):
        the caller gives up what was not taken."""
        assert self.span_fetch is not None
        stats = self.stats

        async def deliver(offset: int, data: bytearray, sums: bytes | None) -> None:
            if await take(offset, data, sums):
                stats.fetches += 1
                stats.fetched_bytes += len(data)

        stats.spans += 1
        try:
            with trio.move_on_after(self.timeout * math.ceil((end - start) / piece)):
                await self.span_fetch(blob.repo, blob.digest, start, end, piece, deliver, unit)
        except NotFound as exc:
            _missing(blob, exc)


def _missing(blob: BlobRef, exc: NotFound) -> NoReturn:
    raise BlobMissing(f"{blob.repo}@{blob.digest}: the registry has lost the blob of a listed "
                      f"file ({exc})", exc.status) from exc
