"""The reader's view of the disk cache: off the trio thread, and never why a read fails.

`DiskCache` (diskcache.py) is synchronous and knows digests; `DiskStore` is what the
reader asks, by `BlobRef`: "have you got chunk i (hashing to this)?", "keep this chunk
(it must hash to this)". Blobs the cache cannot hold (not sha256) are simply never
there. A broken cache disk costs fetches, not reads: its read errors and damaged chunks
become misses and its write errors are logged. Bytes that fail their digest on the way
in are the exception: `DigestMismatch` reaches the caller, since the reader must count
them or drop what it holds of that blob too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import DigestMismatch
from .blob import BlobRef, Chunk, Expect
from .diskcache import DiskCache

log = logging.getLogger(__name__)

# Asked for every chunk a stream passes: remembered rather than matched again.
_cacheable = functools.lru_cache(maxsize=4096)(DiskCache.cacheable)


@dataclass
class DiskStats:
    disk_hits: int = 0
    disk_misses: int = 0  # chunks looked for and not found
    digest_failures: int = 0  # blobs whose chunks, once all stored, failed the digest
    # Where the disk cache costs time: chunks written, and the time spent writing (and
    # hashing) them; their ratio is a chunk's cost.
    stores: int = 0
    store_write_ns: int = 0

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.__dict__)
        out["store_write_s"] = round(out.pop("store_write_ns") / 1e9, 3)  # type: ignore[operator]
        return out


class DiskStore:
    def __init__(self, cache: DiskCache) -> None:
        self.cache = cache
        self.stats = DiskStats()

    @staticmethod
    def takes(blob: BlobRef) -> bool:
        return _cacheable(blob.digest)

    def has(self, blob: BlobRef, index: int) -> bool:
        # On the trio thread: a blob being filled is answered from its bitmap in memory.
        return _cacheable(blob.digest) and self.cache.has_chunk(blob.digest, blob.size, index)

    async def read_chunk(self, blob: BlobRef, index: int, expect: Expect | None
                         ) -> bytes | None:
        """Chunk `index`, hashed and checked (against `expect`, else against the index
        kept with it), or None when the cache has not got it intact (or cannot read it)."""
        if not _cacheable(blob.digest):
            return None
        data = await self._read(blob, self.cache.read_chunk, index, expect)
        if data is None:
            self.stats.disk_misses += 1
        return data

    async def table(self, blob: BlobRef) -> bytes | None:
        """The chunk index of the blob if the cache holds it complete (whole-blob
        verified), else None."""
        if not _cacheable(blob.digest):
            return None
        try:
            return await trio.to_thread.run_sync(self.cache.table, blob.digest, blob.size)
        except OSError as exc:
            log.warning("disk cache read of %s failed (%s); fetching", blob.digest, exc)
            return None

    async def _read(self, blob: BlobRef, read: Callable[..., bytes | None], *args: object
                    ) -> bytes | None:
        try:
            data = await trio.to_thread.run_sync(read, blob.digest, blob.size, *args)
        except OSError as exc:
            log.warning("disk cache read of %s failed (%s); fetching", blob.digest, exc)
            return None
        if data is not None:
            self.stats.disk_hits += 1
        return data

    async def write(self, blob: BlobRef, index: int, data: Chunk, expect: Expect | None,
                    *, checked: bool = False) -> None:
        """Keep a chunk (hashed, checked against `expect` and written in a worker
        thread). Raises ChunkRejected when it does not hash to `expect` (nothing
        written), and DigestMismatch, after dropping the blob from disk, when it
        completes the blob and the whole does not hash to its digest."""
        if not _cacheable(blob.digest):
            return
        t0 = time.perf_counter_ns()
        try:
            await trio.to_thread.run_sync(functools.partial(
                self.cache.write_chunk, blob.digest, blob.size, index, data, expect,
                checked=checked))
        except DigestMismatch:
            self.stats.digest_failures += 1
            raise
        except OSError as exc:
            # A full or broken cache disk costs refetches, not reads.
            log.warning("disk cache write of %s failed: %s", blob.digest, exc)
            return
        self.stats.stores += 1
        self.stats.store_write_ns += time.perf_counter_ns() - t0

    def pin(self, blob: BlobRef) -> None:
        """Keep the blob from eviction while it is open."""
        if _cacheable(blob.digest):
            self.cache.pin(blob.digest)

    def unpin(self, blob: BlobRef) -> None:
        if _cacheable(blob.digest):
            self.cache.unpin(blob.digest)

    def snapshot(self) -> dict[str, object]:
        out = self.stats.snapshot()
        out.update(disk_bytes=self.cache.used_bytes, disk_limit=self.cache.max_bytes,
                   disk_evictions=self.cache.evictions, disk_damaged=self.cache.damaged)
        return out
