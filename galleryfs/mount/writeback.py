"""Write-behind for the disk cache: filled from the kernel's page cache once reads pause.

A chunk fetched for a reader goes to the kernel (and the memory cache) only; it is
*owed* to the disk cache. When no chunk has been fetched for `quiet` seconds, the owed
chunks are written in the order they were fetched, their bytes taken from the memory
cache or asked back from the kernel's page cache of the file that read them
(FUSE_NOTIFY_RETRIEVE, through galleryfs's build of pyfuse3).

Why not write during the read: a cache write competes with the read it caches. Where
the registry reads the blobs from the same disk (the bench machine), cache writes during
a cold read of many files made fetches wait for the writers and slowed the read
markedly; buffered writes cost CPU instead (measured in scripts/bench G2). After the read the
bytes are in the page cache anyway; asking the kernel for them costs a memory copy. This
is the only way the disk cache is written during a sequential read: it needs galleryfs's
build of pyfuse3 (`notify_retrieve`).

Filling the disk cache never costs a second fetch. A chunk the kernel dropped before the
fill (under memory pressure, or on the bench VMs, where DAMON pages out idle page cache
within seconds; or never held: read-ahead the reader did not reach, gone from the memory
cache) is not cached: it is counted as `dropped` and fetched again only if it is read
again. Fetching it for the cache would cost the registry (and a link that may be the
bottleneck) a second copy of every byte the page cache could not keep: twice the egress
for a model larger than memory. `galleryfs warm` (reader.py `warm`) is the way to fill
the cache with a whole file on purpose. So after a read under memory pressure the disk
cache holds what the page cache still held when reads paused (roughly the file's tail),
plus the chunks of random reads, which the reader writes at once.

An unmount takes the page cache with it, so `flush` (run by `galleryfs unmount` and on
SIGTERM) writes what is owed first; what it cannot within its time (`UNMOUNT_FLUSH`), or
an unmount by other means, leaves owed is simply not cached.
Bytes written go through `ChunkReader.store`, which checks every chunk against the
digests it must have (bytes asked back from the page cache are hashed anew; the disk
cache takes nothing unverified) and the whole blob against its digest before the blob is
promoted.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .blob import BlobRef, Chunk

log = logging.getLogger(__name__)

# Seconds without a fetched chunk before the fill starts: a reader going from one file
# to the next keeps fetching, so a model is read whole before its cache is written.
QUIET = 0.5
# Owed chunks remembered at most (32 GiB of 4 MiB chunks): the page cache will have
# dropped the oldest of a longer run anyway.
MAX_OWED = 8192
# A retrieve is answered at once by the kernel; this bounds a lost answer.
PIECE_TIMEOUT = 2.0
# Seconds `galleryfs unmount` lets the daemon write what is owed: within the 15 s an
# unmount takes at most (unmount.py), whatever the registry does.
UNMOUNT_FLUSH = 6.0

Retrieve = Callable[[int, int, int, int], None]  # (inode, size, offset, cookie)


class Source(Protocol):
    """What the write-behind asks of the reader (ChunkReader)."""

    chunk_size: int

    def held(self, blob: BlobRef, index: int) -> Chunk | None:
        """The chunk if it is still in memory."""
        ...

    async def store(self, blob: BlobRef, index: int, data: Chunk, *, checked: bool = False
                    ) -> None:
        """Into the disk cache, if it hashes to what it must (`checked`: bytes from
        `held`, verified already). A digest failure is the reader's to handle."""
        ...


@dataclass
class FillStats:
    owed_max: int = 0
    filled: int = 0  # chunks written to the disk cache
    from_memory: int = 0  # ... of which came from the memory cache
    dropped: int = 0  # chunks not written: neither memory nor the page cache held them
    missed: int = 0  # chunks not written otherwise (forgotten past max_owed, a fault)
    fill_ns: int = 0


@dataclass
class _Reply:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None


class PageCacheFill:
    def __init__(self, source: Source, retrieve: Retrieve, *, quiet: float = QUIET,
                 max_owed: int = MAX_OWED) -> None:
        self.source = source
        self.retrieve = retrieve
        self.quiet = quiet
        self.max_owed = max_owed
        self.stats = FillStats()
        # (digest, size, index) -> blob: a blob is what a revision claims of a digest.
        self._owed: OrderedDict[tuple[str, int, int], BlobRef] = OrderedDict()
        # (digest, size) -> the inodes whose pages hold it: inode -> (where the file
        # starts in the blob, where it ends). A file is the whole blob, or a member of a
        # packed layer (a range of it).
        self._inodes: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}
        self._replies: dict[int, _Reply] = {}
        self._cookies = itertools.count(1)
        self._last_owed = -math.inf
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._flushing = 0
        # Chunks the last flush gave up (gone from the page cache, or a fault).
        self.flush_missed = 0

    @property
    def owed(self) -> int:
        return len(self._owed)

    def opened(self, blob: BlobRef, inode: int, base: int = 0, length: int | None = None
               ) -> None:
        """`inode` is being read: the pages of `blob` (from byte `base` on, `length`
        bytes of it) will be found there."""
        end = blob.size if length is None else base + length
        files = self._inodes.setdefault((blob.digest, blob.size), {})
        files.pop(inode, None)  # the latest opened is asked first
        files[inode] = (base, end)

    def owe(self, blob: BlobRef, index: int) -> None:
        """A chunk fetched from the registry went to a reader, not yet to the disk cache
        (ChunkReader.defer)."""
        key = (blob.digest, blob.size, index)
        self._owed[key] = blob
        self._owed.move_to_end(key)
        while len(self._owed) > self.max_owed:
            self._owed.popitem(last=False)
            self.stats.missed += 1
        self.stats.owed_max = max(self.stats.owed_max, len(self._owed))
        self._last_owed = trio.current_time()
        if self._drained.is_set():
            self._drained = trio.Event()
        self._wake.set()

    async def retrieve_reply(self, cookie: int, inode: int, offset: int, data: bytes) -> None:
        reply = self._replies.get(cookie)
        if reply is not None:
            reply.data = data
            reply.done.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Fill until cancelled (in the mount's nursery)."""
        task_status.started()
        while True:
            if not self._owed:
                self._drained.set()
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            wait = self._last_owed + self.quiet - trio.current_time()
            if wait > 0 and not self._flushing:
                # Woken early by a flush; a new owed chunk only moves the deadline.
                with trio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            (digest, _, index), blob = self._owed.popitem(last=False)
            try:
                await self._fill(blob, index)
            except Exception:  # a fault here must not take the mount down with it
                log.exception("write-behind of %s chunk %d failed", digest, index)
                self.stats.missed += 1

    async def drained(self) -> None:
        """Until nothing is owed: every owed chunk written, or given up."""
        await self._drained.wait()

    async def flush(self, timeout: float) -> bool:
        """Write what is owed now, without waiting for quiet. True when nothing is left."""
        self._flushing += 1
        self._wake.set()
        lost = self.stats.missed + self.stats.dropped
        try:
            with trio.move_on_after(timeout):
                await self.drained()
        finally:
            self._flushing -= 1
            self.flush_missed = self.stats.missed + self.stats.dropped - lost
        return not self._owed

    async def _fill(self, blob: BlobRef, index: int) -> None:
        t0 = trio.current_time()
        cs = self.source.chunk_size
        start, end = index * cs, min(blob.size, (index + 1) * cs)
        data: Chunk | None = self.source.held(blob, index)
        checked = data is not None
        if checked:
            self.stats.from_memory += 1
        else:
            data = await self._from_page_cache(blob, start, end)
        if data is None:
            # Gone from memory and (in part at least) from the page cache: not fetched
            # again, which would cost the registry a second copy (module docstring).
            log.debug("write-behind of %s chunk %d: dropped by the kernel, not cached",
                      blob.digest, index)
            self.stats.dropped += 1
            return
        await self.source.store(blob, index, data, checked=checked)
        self.stats.filled += 1
        self.stats.fill_ns += int((trio.current_time() - t0) * 1e9)

    async def _from_page_cache(self, blob: BlobRef, start: int, end: int) -> bytes | None:
        files = self._inodes.get((blob.digest, blob.size), {})
        # A file holding the whole chunk (a chunk across two members: none does).
        inode, base = next(((i, b) for i, (b, e) in reversed(files.items())
                            if b <= start and end <= e), (None, 0))
        if inode is None:
            return None
        pieces: list[bytes] = []
        pos = start
        while pos < end:
            cookie = next(self._cookies)
            reply = self._replies[cookie] = _Reply()
            try:
                try:
                    self.retrieve(inode, end - pos, pos - base, cookie)
                except OSError as exc:  # the kernel forgot the inode
                    log.debug("retrieve of inode %d failed: %s", inode, exc)
                    return None
                with trio.move_on_after(PIECE_TIMEOUT):
                    await reply.done.wait()
            finally:
                del self._replies[cookie]
            if not reply.data:  # a page the kernel does not hold, or no answer
                return None
            pieces.append(reply.data)
            pos += len(reply.data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
