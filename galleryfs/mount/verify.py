"""What every chunk must hash to, and the checks that happen before any reader, cache or
write-behind sees a byte fetched from the network.

A chunk's expected digests (`Expect`, blob.py) come from, in order:

- the file's chunk table in its revision's manifest (`BlobRef.table`), when the mount's
  chunk size is a multiple of the table's: each table piece of the chunk is checked;
- the blob digest itself, for a sha256 blob no larger than one chunk;
- a table derived for the mount's life under `--verify strict`: before the first byte
  of a blob without a usable table is served, the whole blob is streamed once (one
  range request), hashed chunk by chunk and whole, and the chunk digests are kept only
  if the whole matches the blob digest. A blob the disk cache holds complete (verified
  whole when it was stored) lends its chunk index instead, without a fetch.

Under `--verify end`, a blob without a table is served unchecked, as before galleryfs
verified chunks: only the disk cache's whole-blob hash catches damage, after the fact.

Hashing runs in worker threads (hashlib releases the GIL on large buffers), on the
chunk's own buffer (no copy). A mismatch is one warning naming the file, its digest and
the chunk, and a count (`verify_failures`): the bytes go nowhere, and the next read
fetches them again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field

import trio

from ..errors import DigestMismatch, RegistryUnavailable, first_error
from ..modelpack import CHUNK_DIGEST, ChunkTable
from .blob import BlobRef, Chunk, Expect
from .diskstore import DiskStore
from .fetch import BlobFetch

log = logging.getLogger(__name__)

STRICT = "strict"
END = "end"
MODES = (STRICT, END)
# Hashing threads at once: hashing is CPU work, and the machine has few cores.
HASHERS = 2


# A table's expectations, made once: asked for every chunk of the read-ahead window on
# every read (the memory cache's keys), and one object per chunk makes key compares an
# identity check (scripts/bench G1: 3x the trio thread's time per read otherwise). The
# tables of the files open at once, and a few more.
@functools.lru_cache(maxsize=64)
def _table_expects(table: ChunkTable, chunk_size: int) -> tuple[Expect, ...]:
    per = chunk_size // table.chunk_size * CHUNK_DIGEST
    return tuple(Expect(table.chunk_size, table.digests[i:i + per])
                 for i in range(0, len(table.digests), per))


@functools.lru_cache(maxsize=1024)
def _digest_expect(digest: str, chunk_size: int) -> Expect:
    return Expect(chunk_size, bytes.fromhex(digest[7:]))


class ChunkMismatch(DigestMismatch):
    """Bytes that failed their expected digest; already logged, once, where found."""


@dataclass
class VerifyStats:
    verified_chunks: int = 0  # chunks from the network checked and found right
    verified_pieces: int = 0  # table pieces fetched for reads outside a stream, found right
    verify_failures: int = 0  # ... found wrong (not served, not cached)
    derived_blobs: int = 0  # blobs without a table verified whole before serving
    derived_bytes: int = 0  # bytes streamed for that


@dataclass
class _Derivation:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


BlobKey = tuple[str, int]


class Verifier:
    def __init__(self, chunk_size: int, mode: str = STRICT, *, fetch: BlobFetch,
                 disk: DiskStore | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"verify mode {mode!r}: expected one of {', '.join(MODES)}")
        self.chunk_size = chunk_size
        self.strict = mode == STRICT
        self.fetch = fetch
        self.disk = disk
        self.stats = VerifyStats()
        self.limiter = trio.CapacityLimiter(HASHERS)
        # (digest, size) -> the chunk digests of a blob verified whole.
        self._derived: dict[BlobKey, bytes] = {}
        self._from_disk: set[BlobKey] = set()  # ... of which came from a disk index
        self._distrust_disk: set[BlobKey] = set()
        self._deriving: dict[BlobKey, _Derivation] = {}

    # ---- what a chunk must hash to ------------------------------------------------

    def expect(self, blob: BlobRef, index: int) -> Expect | None:
        """The digests chunk `index` must have; None when nothing says yet."""
        cs = self.chunk_size
        table = blob.table
        if table is not None and cs % table.chunk_size == 0:
            expects = _table_expects(table, cs)
            # Past its end (a table that does not fit the blob): digests nothing matches.
            return expects[index] if 0 <= index < len(expects) else Expect(table.chunk_size, b"")
        if blob.size <= cs and blob.digest.startswith("sha256:"):
            return _digest_expect(blob.digest, cs)
        derived = self._derived.get((blob.digest, blob.size))
        if derived is not None:
            return Expect(cs, derived[index * CHUNK_DIGEST:(index + 1) * CHUNK_DIGEST])
        return None

    def piece_size(self, blob: BlobRef) -> int:
        """The table's chunk when it is finer than the mount's (and divides it): a read
        outside a stream fetches and checks just the table pieces it touches. 0 when
        the mount's chunk is the smallest unit that can be verified."""
        table = blob.table
        cs = self.chunk_size
        if (table is None or table.chunk_size >= cs or cs % table.chunk_size
                or not table.fits(blob.size)):
            return 0
        return table.chunk_size

    def pieces_expect(self, blob: BlobRef, first: int, last: int) -> Expect:
        """What table pieces first..last must hash to (`piece_size` is not 0)."""
        assert blob.table is not None
        return Expect(blob.table.chunk_size,
                      blob.table.digests[first * CHUNK_DIGEST:(last + 1) * CHUNK_DIGEST])

    def pending(self, blob: BlobRef) -> bool:
        """True when no byte of the blob may be served before `prepare`."""
        return self.strict and blob.size > 0 and self.expect(blob, 0) is None

    def trusts_unverified(self, blob: BlobRef) -> bool:
        """`--verify end` and no table: bytes are served as the registry sends them."""
        return not self.strict and self.expect(blob, 0) is None

    # ---- checks --------------------------------------------------------------------

    async def matches(self, data: Chunk, expect: Expect) -> bool:
        """Whether `data` hashes to `expect`, hashed now, in a worker thread."""
        return await trio.to_thread.run_sync(expect.matches, data, limiter=self.limiter)

    async def holds(self, data: Chunk, expect: Expect, sums: bytes | None) -> bool:
        """Whether `data` hashes to `expect`: by the sha256 per `expect.piece` bytes the
        receiving thread computed (`sums`), else by `matches`."""
        if sums is not None:
            return expect.agrees(len(data), expect.piece, sums)
        return await self.matches(data, expect)

    async def check(self, blob: BlobRef, index: int, data: Chunk, expect: Expect,
                    sums: bytes | None = None) -> None:
        """Raise ChunkMismatch (logged, counted) unless `data` hashes to `expect`. `sums`:
        its sha256 per `expect.piece` bytes, hashed by the thread that received it
        (compared here), or None (hashed now, in a worker thread)."""
        if await self.holds(data, expect, sums):
            self.stats.verified_chunks += 1
            return
        raise self.mismatch(blob, index)

    def mismatch(self, blob: BlobRef, index: int, what: str = "") -> ChunkMismatch:
        """Count and log a chunk that failed its digests; the error to raise."""
        self.stats.verify_failures += 1
        key = (blob.digest, blob.size)
        source = ("its chunk table" if blob.table is not None and self.chunk_size %
                  blob.table.chunk_size == 0 else
                  "the blob digest" if blob.size <= self.chunk_size else
                  "the table derived when the blob was verified whole")
        if key in self._from_disk:
            # The disk cache's index stood in for the table and the registry disagrees:
            # trust neither until the blob is verified whole from the network again.
            source = "the disk cache's chunk index"
            self._derived.pop(key, None)
            self._from_disk.discard(key)
            self._distrust_disk.add(key)
        message = (f"{blob}: chunk {index} of {blob.digest} does not match {source}"
                   f"{what}: not served, not cached")
        log.warning("%s", message)
        return ChunkMismatch(message)

    # ---- blobs without a table (--verify strict) ----------------------------------

    async def prepare(self, blob: BlobRef) -> None:
        """Make sure the blob's chunks have expected digests (`pending` no more): from
        the disk cache's index of the complete blob, or by verifying it whole from the
        network. One derivation per blob at a time; its waiters share its outcome."""
        key = (blob.digest, blob.size)
        while self.pending(blob):
            running = self._deriving.get(key)
            if running is not None:
                await running.done.wait()
                if running.error is not None:
                    raise running.error
                continue
            running = self._deriving[key] = _Derivation()
            try:
                self._derived[key] = await self._derive(blob, key)
            except trio.Cancelled:
                # This task's cancel, not the blob's fault: a waiter tries again itself.
                running.error = None
                raise
            except BaseException as exc:
                running.error = exc
                raise
            finally:
                del self._deriving[key]
                running.done.set()

    async def _derive(self, blob: BlobRef, key: BlobKey) -> bytes:
        if self.disk is not None and key not in self._distrust_disk:
            table = await self.disk.table(blob)
            if table is not None:
                self._from_disk.add(key)
                return table
        cs = self.chunk_size
        algo = blob.digest.partition(":")[0]
        whole = hashlib.new(algo)
        parts: list[bytes] = []
        reached = 0

        def hash_piece(data: Chunk, sums: bytes | None) -> bytes:  # in a worker thread
            whole.update(data)
            # The chunk's digest: hashed by the thread that received it, or here.
            return sums if sums is not None else hashlib.sha256(data).digest()

        send, receive = trio.open_memory_channel[tuple[int, Chunk, bytes | None]](1)

        async def consume() -> None:
            nonlocal reached
            async with receive:
                async for offset, data, sums in receive:
                    if offset != reached or len(data) != min(cs, blob.size - offset):
                        raise RegistryUnavailable(
                            f"{blob}: got {len(data)} bytes at {offset} streaming {blob.digest}")
                    parts.append(await trio.to_thread.run_sync(hash_piece, data, sums,
                                                               limiter=self.limiter))
                    reached += len(data)

        async def take(offset: int, data: bytearray, sums: bytes | None) -> bool:
            await send.send((offset, data, sums))
            return True

        log.info("%s: no chunk table; verifying all %d bytes of %s before serving it "
                 "(--verify strict)", blob, blob.size, blob.digest)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                async with send:
                    if self.fetch.spans:
                        await self.fetch.span(blob, 0, blob.size, cs, take, cs)
                    else:
                        for start in range(0, blob.size, cs):
                            await take(start, await self.fetch.range(
                                blob, start, min(blob.size, start + cs)), None)
        except BaseExceptionGroup as group:
            # Callers map single galleryfs errors to errno; a group would hide them.
            raise first_error(group) from None
        self.stats.derived_bytes += reached
        if reached != blob.size:
            raise RegistryUnavailable(f"{blob}: {blob.digest} streamed only {reached} of "
                                      f"{blob.size} bytes")
        got = f"{algo}:{whole.hexdigest()}"
        if got != blob.digest:
            self.stats.verify_failures += 1
            message = (f"{blob}: {blob.digest} hashes to {got} as a whole: not served, "
                       f"not cached")
            log.warning("%s", message)
            raise ChunkMismatch(message)
        self.stats.derived_blobs += 1
        self._distrust_disk.discard(key)
        return b"".join(parts)
