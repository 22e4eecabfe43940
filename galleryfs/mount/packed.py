"""Packed (tar) layers in the mount: their members listed in the layer's place, and read.

An uncompressed tar is read lazily: its headers are read through the chunk reader (the
same chunks, verification and caches as any file), one jump per member, and a member is
the byte range [offset, offset+size) of the layer blob: opening it opens the blob, and
reads are shifted by the offset, with the blob's read-ahead kept inside the member.

A compressed tar (gzip, zstd) has no offsets to jump to. Its blob is fetched once per
mount, when its revision folder is first listed (range requests, not kept: a remount
fetches it again), hashed whole against the layer digest whatever `--verify` says, and
decompressed meanwhile into an unnamed temporary file in the cache
folder (`O_TMPFILE`: gone with the mount, never found by name). The sha256 of each chunk
of the decompressed tar is kept in memory as it is written, and every chunk read back is
checked against it. Without a disk cache (`--cache-size 0`) there is nowhere to put it:
such a layer stays listed as one file that cannot be opened (EOPNOTSUPP, with the reason
in `user.galleryfs.unsupported`); so does one that would unpack to more than the cache
size, or to more than is left of it after the layers unpacked before (all unpacked
layers of a mount together take at most `--cache-size`, beside the disk cache's own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from .. import tarindex
from ..errors import DigestMismatch, UnsupportedContent, first_error
from ..modelpack import TAR, Revision, RevisionFile
from .blob import BlobRef
from .reader import BlobHandle, ChunkReader

log = logging.getLogger(__name__)

# Checked chunks of an unpacked tar kept per layer (a few streams reading at once).
CHECKED_CHUNKS = 4


class Handle(Protocol):
    """An open file of the mount (BlobHandle, or a member of a packed layer)."""

    async def read(self, offset: int, size: int) -> memoryview | bytes: ...

    def close(self) -> None: ...


@dataclass
class PackedStats:
    packed_layers: int = 0  # layers listed
    packed_header_bytes: int = 0  # tar header bytes read to list them
    unpacked_layers: int = 0  # compressed layers decompressed
    unpacked_bytes: int = 0


class LocalTar:
    """A decompressed tar in an unnamed file; every chunk read is checked against the
    sha256 taken when it was written."""

    def __init__(self, fd: int, size: int, chunk_size: int, digests: list[bytes]) -> None:
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self.digests = digests
        self._lock = threading.Lock()
        # The last chunks checked: reads of a few KiB each do not hash a chunk each.
        self._checked: OrderedDict[int, bytes] = OrderedDict()

    def _chunk(self, index: int) -> bytes:
        data = self._checked.get(index)
        if data is not None:
            self._checked.move_to_end(index)
            return data
        cs = self.chunk_size
        data = os.pread(self.fd, min(cs, self.size - index * cs), index * cs)
        if hashlib.sha256(data).digest() != self.digests[index]:
            raise DigestMismatch(f"chunk {index} of an unpacked layer changed on disk")
        self._checked[index] = data
        while len(self._checked) > CHECKED_CHUNKS:
            self._checked.popitem(last=False)
        return data

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size), short only at the end (in a worker thread)."""
        end = min(self.size, offset + size)
        cs = self.chunk_size
        out = bytearray()
        with self._lock:
            pos = offset
            while pos < end:
                chunk = self._chunk(pos // cs)
                base = pos // cs * cs
                piece = chunk[pos - base: end - base]
                out += piece
                pos += len(piece)
        return bytes(out)

    def close(self) -> None:
        os.close(self.fd)


class MemberHandle:
    """A member of an uncompressed tar: its range of the layer blob, read through the
    blob's handle (chunks, caches, verification), read-ahead kept inside the member."""

    def __init__(self, inner: BlobHandle, offset: int, size: int) -> None:
        self.inner = inner
        self.offset = offset
        self.size = size

    async def read(self, offset: int, size: int) -> memoryview | bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        inner, reader, blob = self.inner, self.inner.reader, self.inner.blob
        start, stop = self.offset + offset, self.offset + end
        window = inner.readahead.observe(start, stop - start)
        window = max(0, min(window, self.offset + self.size - stop))
        cs = reader.chunk_size
        if (not window and offset != 0 and not any(
                reader.at_hand(blob, i) for i in range(start // cs, (stop - 1) // cs + 1))):
            return await reader.read_random(blob, start, stop)  # as BlobHandle.read
        data = await reader.read_view(blob, start, stop - start)
        inner.stream.served(start, start + len(data))
        if window:
            inner.stream.advance(start + len(data), window)
        return data

    def close(self) -> None:
        self.inner.close()


class LocalMemberHandle:
    def __init__(self, tar: LocalTar, offset: int, size: int) -> None:
        self.tar = tar
        self.offset = offset
        self.size = size

    async def read(self, offset: int, size: int) -> bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        return await trio.to_thread.run_sync(self.tar.read, self.offset + offset, end - offset)

    def close(self) -> None:
        pass


@dataclass
class _Layer:
    lock: trio.Lock = field(default_factory=trio.Lock)
    listing: tarindex.Listing | None = None
    local: LocalTar | None = None
    refused: str = ""  # why it stays one unservable file


class _Compressed:
    """The compressed blob as a file-like object for the decompressing thread: `read`
    takes the next piece the fetching task received (one or two ahead, so the network
    and the decompression overlap) and hashes it. Not checked by chunk: nothing
    unpacked is used before the whole blob matched its digest (one pass over the
    network, whatever `--verify` says)."""

    def __init__(self, algorithm: str, pieces: trio.MemoryReceiveChannel[bytes]) -> None:
        self.pieces = pieces
        self.hash = hashlib.new(algorithm)
        self.pending = b""
        self.taken = 0

    async def _take(self) -> bytes:
        try:
            return await self.pieces.receive()
        except trio.EndOfChannel:
            return b""

    def _next(self) -> bytes:
        data = trio.from_thread.run(self._take)
        self.hash.update(data)
        return data

    def read(self, n: int = -1, /) -> bytes:
        if self.taken >= len(self.pending):
            self.pending, self.taken = self._next(), 0
        # Decompressors ask for a few KiB at a time: hand out slices, never re-cut the rest.
        end = len(self.pending) if n < 0 else min(len(self.pending), self.taken + n)
        out = self.pending[self.taken:end]
        self.taken = end
        return out

    def drain(self) -> None:
        """Hash the rest (a trailer, padding; everything after damage)."""
        while self._next():
            pass


class SpillBudget:
    """What all unpacked layers of a mount may take on disk together (`--cache-size`):
    each layer alone within it is not enough, a revision of many layers (or `ls -R` over
    a gallery) would fill the disk with unnamed files that live as long as the mount."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # spills write from worker threads

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise ValueError(f"the compressed layers unpacked in this mount would take "
                                 f"more than --cache-size ({self.limit} bytes)")
            self.used += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _Spill:
    """The decompressed tar as it is written: into the unnamed file, hashed by chunk."""

    def __init__(self, fd: int, chunk_size: int, budget: SpillBudget) -> None:
        self.fd = fd
        self.chunk_size = chunk_size
        self.budget = budget
        self.budget_taken = 0
        self.size = 0
        self.digests: list[bytes] = []
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        # ValueError beyond the budget: the layer is refused with the reason, as a bomb.
        self.budget.take(len(data))
        self.budget_taken += len(data)
        view = memoryview(data)
        while view:
            room = self.chunk_size - self.size % self.chunk_size
            piece, view = view[:room], view[room:]
            os.pwrite(self.fd, piece, self.size)
            self._hash.update(piece)
            self.size += len(piece)
            if self.size % self.chunk_size == 0:
                self.digests.append(self._hash.digest())
                self._hash = hashlib.sha256()

    def finish(self) -> list[bytes]:
        if self.size % self.chunk_size:
            self.digests.append(self._hash.digest())
        return self.digests


class PackedLayers:
    """Lists packed layers (`expand`, for the tree) and opens their members."""

    def __init__(self, reader: ChunkReader, *, spill_dir: str | None = None,
                 spill_limit: int = 0) -> None:
        self.reader = reader
        self.spill_dir = spill_dir
        self.spill_limit = spill_limit
        self.stats = PackedStats()
        self.budget = SpillBudget(spill_limit)
        self._layers: dict[tuple[str, int], _Layer] = {}

    async def expand(self, repo: str, revision: Revision) -> Revision:
        """The revision with its packed layers' members in their place (Tree.unpack)."""
        packed = [f for f in revision.files if f.packing]
        if not packed:
            return revision
        listings: dict[str, tarindex.Listing | None] = {}
        refused: dict[str, str] = {}
        for f in packed:
            try:
                layer = await self._layer(repo, f)
            except DigestMismatch as exc:
                # Damaged bytes in one layer: that layer stays one file that cannot be
                # opened (the reason in its xattr), the revision's other files still show.
                listings[f.digest] = None
                refused[f.digest] = f"packed layer ({f.media_type}) failed its check: {exc}"
                continue
            listings[f.digest] = layer.listing
            if layer.refused:
                refused[f.digest] = layer.refused
        expanded = tarindex.expand(revision, listings)
        if refused:
            files = tuple(replace(f, reason=refused[f.digest])
                          if f.packing and f.digest in refused else f for f in expanded.files)
            expanded = replace(expanded, files=files)
        return expanded

    async def _layer(self, repo: str, f: RevisionFile) -> _Layer:
        layer = self._layers.setdefault((f.digest, f.size), _Layer())
        async with layer.lock:
            if layer.listing is None and not layer.refused:
                blob = BlobRef(repo, f.digest, f.size, f.table, label=f"{repo}@{f.digest}")
                if f.packing == TAR:
                    layer.listing = await self._list_tar(blob)
                elif self.spill_dir is None:
                    layer.refused = (f"compressed packed layer ({f.media_type}): unpacked "
                                     "only into the disk cache, and --cache-size is 0")
                else:
                    await self._unpack(blob, f.packing, layer)
                if layer.listing is not None:
                    self.stats.packed_layers += 1
                    self.stats.packed_header_bytes += layer.listing.header_bytes
        return layer

    async def _list_tar(self, blob: BlobRef) -> tarindex.Listing:
        async def read(offset: int, size: int) -> bytes:
            # Not owed to the write-behind: no file's page cache holds these bytes.
            return bytes(await self.reader.read_view(blob, offset, size, owe=False))

        return await tarindex.aindex(read, blob.size)

    async def _unpack(self, blob: BlobRef, packing: str, layer: _Layer) -> None:
        assert self.spill_dir is not None
        fd = os.open(self.spill_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
        spill = _Spill(fd, self.reader.chunk_size, self.budget)
        send, receive = trio.open_memory_channel[bytes](1)
        source = _Compressed(blob.digest.partition(":")[0], receive)
        fetcher, piece = self.reader.fetcher, self.reader.chunk_size

        async def fetch() -> None:
            async with send:
                for start in range(0, blob.size, piece):
                    end = min(blob.size, start + piece)
                    await send.send(bytes(await fetcher.range(blob, start, end)))

        def unpack() -> str:
            try:
                tarindex.inflate(source, packing, spill.write, self.spill_limit)
                damage = ""
            except ValueError as exc:
                damage = str(exc)
            # The digest decides whether the registry or the layer is at fault.
            source.drain()
            return damage

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch)
                try:
                    damage = await trio.to_thread.run_sync(unpack)
                finally:
                    nursery.cancel_scope.cancel()  # a failed unpack stops the fetch
            got = f"{blob.digest.partition(':')[0]}:{source.hash.hexdigest()}"
            if got != blob.digest:
                raise DigestMismatch(f"{blob}: the compressed layer hashes to {got}: "
                                     "not unpacked")
        except BaseException as exc:
            os.close(fd)
            self.budget.give_back(spill.budget_taken)
            if isinstance(exc, BaseExceptionGroup):
                raise first_error(exc) from None
            raise
        if damage:
            os.close(fd)
            self.budget.give_back(spill.budget_taken)
            layer.refused = f"packed layer {blob.digest}: {damage}"
            log.warning("%s", layer.refused)
            return
        local = LocalTar(fd, spill.size, spill.chunk_size, spill.finish())
        layer.local = local
        self.stats.unpacked_layers += 1
        self.stats.unpacked_bytes += spill.size
        layer.listing = await trio.to_thread.run_sync(
            lambda: tarindex.index(local.read, local.size))

    # ---- reads -------------------------------------------------------------------

    def open(self, repo: str, f: RevisionFile, label: str, nursery: trio.Nursery | None
             ) -> Handle:
        member = f.member
        if member is None or member.folder:
            raise UnsupportedContent(f"{label}: not a file of a packed layer")
        layer = self._layers.get((f.digest, member.layer_size))
        if member.packing == TAR:
            blob = BlobRef(repo, f.digest, member.layer_size, f.table, label=label)
            return MemberHandle(self.reader.open(blob, nursery), member.offset, f.size)
        if layer is None or layer.local is None:
            raise UnsupportedContent(f"{label}: its packed layer is not unpacked")
        return LocalMemberHandle(layer.local, member.offset, f.size)

    def snapshot(self) -> dict[str, object]:
        return dict(self.stats.__dict__)

    def close(self) -> None:
        for layer in self._layers.values():
            if layer.local is not None:
                layer.local.close()
                layer.local = None

