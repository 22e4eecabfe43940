"""Blob bytes from the registry for the mount: bounded in time, checked in length, counted.
What they must hash to is verify.py's business, checked before anyone sees them.

Every network fetch of the data path goes through `BlobFetch`, so a dead registry turns
into an error rather than a hang, and a blob the registry lost turns into `BlobMissing`:
a file the listing shows but whose bytes are gone is damage (EIO), not absence (ENOENT).

Time is bounded by stalls, not totals (registry/deadline.py): a fetch gives up once
`timeout` passes without 64 KiB of it arriving, retries and fallbacks included. A reader
(`waiting`) gives up once no 64 KiB *of its blob* arrived for `timeout`, whichever task
fetches them: a read queued behind a prefetch span or a whole-blob check of the same
blob waits while those move, and not `timeout` more for each of them when they stall.

Two shapes: `range`, exactly bytes [start, end) in one buffer; and `span`, one request
for a run of chunks handed over chunk by chunk as they arrive (the registry spends far
less CPU per byte on a few long ranges than on many chunk-sized ones). A stream's span
is gated (`SpanGate`): its request runs on as the stream claims more, and ends where the
stream stops claiming.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import trio

from ..errors import (
    AuthError,
    BlobMissing,
    GalleryError,
    NotFound,
    RegistryError,
    RegistryUnavailable,
)
from ..registry.deadline import Watchdog
from .blob import BlobRef, Chunk

# (repo, digest, start, end) -> exactly bytes [start, end)
Fetcher = Callable[[str, str, int, int], Awaitable[Chunk]]
# (offset, bytes, sums) of one piece of a span, handed over as it arrives; sums: the raw
# sha256 of each `unit` bytes of the piece, hashed by the thread that received it, or
# None (not hashed: the taker hashes it)
Deliver = Callable[[int, bytearray, bytes | None], Awaitable[None]]
# (repo, digest, start, end, piece size, deliver, unit, gate): bytes [start, end) with
# one request, delivered piece by piece in order, digested per `unit` bytes (0: not),
# received only as far as the gate (if any) lets it; returns the offset reached (end
# unless it failed or its gate stopped it)
SpanFetcher = Callable[[str, str, int, int, int, Deliver, int, "SpanGate | None"],
                       Awaitable[int]]
# A span's piece for its taker: False when it was no longer wanted (not counted). The
# span receives the next piece meanwhile (ranges.AHEAD), and the one after that only once
# this returns.
Take = Callable[[int, bytearray, bytes | None], Awaitable[bool]]


# Seconds a stream's request waits for the stream's next claim before it ends
# (SpanGate): a reader that paused longer costs a new request when it resumes.
SPAN_IDLE = 2.0
# Seconds after the registry failed a read in which the kernel's read of one page of it
# fails at once (BlobFetch.waiting).
FAILURE_MEMORY = 1.0
PAGE = 4096


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
        # (digest, size) -> the progress of every fetch of that blob, while anyone waits.
        self._blobs: weakref.WeakValueDictionary[tuple[str, int], Watchdog] = (
            weakref.WeakValueDictionary())
        # (digest, size) -> when the registry failed a read of it, where, and how.
        self._failed: dict[tuple[str, int], tuple[float, int, int, GalleryError]] = {}

    @property
    def spans(self) -> bool:
        return self.span_fetch is not None

    def _blob(self, blob: BlobRef) -> Watchdog:
        key = (blob.digest, blob.size)
        dog = self._blobs.get(key)
        if dog is None:
            dog = self._blobs[key] = Watchdog(self.timeout, f"{blob.repo}@{blob.digest}")
        return dog

    def _fetching(self, blob: BlobRef) -> Watchdog:
        """The watchdog of one fetch, its bytes counted for the blob too."""
        return Watchdog(self.timeout, f"{blob.repo}@{blob.digest}", parent=self._blob(blob))

    @contextmanager
    def waiting(self, blob: BlobRef, offset: int, size: int) -> Iterator[None]:
        """A read's wait for bytes [offset, offset+size) of the blob: `RegistryUnavailable`
        once none of the blob's bytes arrived for `timeout` (module docstring).

        When the registry fails a read (a stall, an error after retries), the kernel
        follows it with a read of one page of it (the failed read was its read-ahead),
        which would double the time to EIO: that read, for a second, fails the same at
        once. Any other read asks again."""
        key = (blob.digest, blob.size)
        failed = self._failed.pop(key, None)
        if (failed is not None and size <= PAGE and failed[1] <= offset < failed[2]
                and trio.current_time() - failed[0] < FAILURE_MEMORY):
            raise failed[3].with_traceback(None)
        dog = self._blob(blob)
        try:
            with dog.watch() as scope:
                yield
            if scope.cancelled_caught:
                raise dog.stalled()
        except (RegistryUnavailable, RegistryError) as exc:
            if not isinstance(exc, AuthError):  # EACCES; a token renewal may cure it
                self._failed[key] = (trio.current_time(), offset, offset + size, exc)
                while len(self._failed) > 64:
                    del self._failed[next(iter(self._failed))]
            raise

    async def range(self, blob: BlobRef, start: int, end: int) -> Chunk:
        """Bytes [start, end) of the blob, straight from the registry."""
        dog = self._fetching(blob)
        try:
            with dog.watch() as scope:
                data = await self.fetch(blob.repo, blob.digest, start, end)
        except NotFound as exc:
            _missing(blob, exc)
        if scope.cancelled_caught:
            raise dog.stalled()
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

        dog = self._fetching(blob)
        try:
            with dog.watch() as scope:
                await self.span_fetch(blob.repo, blob.digest, start, end, end - start, deliver,
                                      unit, None)
        except NotFound as exc:
            _missing(blob, exc)
        if scope.cancelled_caught:
            raise dog.stalled()
        if len(got) != 1 or len(got[0][0]) != end - start:
            raise RegistryUnavailable(
                f"{blob.repo}@{blob.digest}: got {sum(len(d) for d, _ in got)} bytes in "
                f"{len(got)} pieces for a {end - start} byte range")
        self.stats.fetches += 1
        self.stats.fetched_bytes += end - start
        return got[0]

    async def span(self, blob: BlobRef, start: int, end: int, piece: int, take: Take,
                   unit: int = 0, gate: SpanGate | None = None) -> None:
        """Bytes [start, end) with one request, handed to `take` `piece` bytes at a time
        (with their sha256 per `unit` bytes where the receiving thread hashed them).
        Returns early, without an error, once it stalls (`timeout` without 64 KiB): the
        caller gives up what was not taken."""
        assert self.span_fetch is not None
        stats = self.stats

        async def deliver(offset: int, data: bytearray, sums: bytes | None) -> None:
            if await take(offset, data, sums):
                stats.fetches += 1
                stats.fetched_bytes += len(data)

        stats.spans += 1
        try:
            with self._fetching(blob).watch():
                await self.span_fetch(blob.repo, blob.digest, start, end, piece, deliver, unit,
                                      gate)
        except NotFound as exc:
            _missing(blob, exc)


class SpanGate:
    """How far a stream's range request may be received: its chunks are claimed a
    window at a time, and each claim moves `until` on, so one request serves the whole
    stream instead of one per window. The registry spends a fixed cost on every range
    request (about 9 ms of CPU each for distribution 2.8 here, whatever its length:
    scripts/bench G1); a paused request costs it nothing but a blocked send.

    The receiving thread waits at `until` for the next claim, `idle` seconds at most;
    then, or once the stream starts a request elsewhere (`close`), the gate is shut and
    the request ends there: the bytes the registry had sent beyond it (at most what the
    socket buffers hold) are counted and dropped."""

    def __init__(self, until: int, idle: float = SPAN_IDLE) -> None:
        self._cond = threading.Condition()
        self.until = until
        self.idle = idle
        self.shut = False

    def extend(self, until: int) -> bool:
        """Let the request run to `until` (trio thread); False once the gate is shut."""
        with self._cond:
            if self.shut:
                return False
            self.until = max(self.until, until)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """No further claims: the request ends at `until`."""
        with self._cond:
            self.shut = True
            self._cond.notify_all()

    def wait(self, offset: int) -> bool:  # in the receiving thread
        deadline = time.monotonic() + self.idle
        with self._cond:
            while offset >= self.until and not self.shut:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.shut = True  # an extension now would come too late
                    break
                self._cond.wait(left)
            return offset < self.until


def _missing(blob: BlobRef, exc: NotFound) -> NoReturn:
    raise BlobMissing(f"{blob.repo}@{blob.digest}: the registry has lost the blob of a listed "
                      f"file ({exc})", exc.status) from exc
