"""Verified table pieces held in memory for reads outside a stream.

A file whose chunk table is finer than the mount's chunk (galleryfs's own pushes of files
up to a few GiB: 64 KiB pieces) is read outside a stream a piece at a time: a read
fetches and checks only the pieces it touches, not the 4 MiB chunk around them (one
tensor by `get_tensor` cost three chunks). The pieces are kept here, bounded in bytes,
for two reasons: the kernel's requests seldom end on a piece boundary, so the next
request starts in a piece the last one fetched; and when reads turn out to be a stream
after all, the reader builds the chunk from the pieces it holds and fetches only the
rest, so no byte is fetched twice.

Keys carry the expected digest, as the chunk cache's do: bytes are found only by readers
that expect exactly them. Only verified pieces are put here.
"""

from __future__ import annotations

from collections import OrderedDict

from ..modelpack import CHUNK_DIGEST
from .blob import BlobRef, Expect

# (blob digest, blob size, piece size, piece index, expected sha256)
PieceKey = tuple[str, int, int, int, bytes]

# Enough for the reads of a few files before their streams start (half a default chunk
# each, prefetch.py) and for a random reader's recent pieces; a piece taken into a chunk
# leaves at once.
PIECE_MEMORY = 8 << 20


def piece_key(blob: BlobRef, expect: Expect, first: int, index: int) -> PieceKey:
    """The key of piece `index` of the blob, `expect` naming pieces from `first` on."""
    at = (index - first) * CHUNK_DIGEST
    return (blob.digest, blob.size, expect.piece, index, expect.digests[at:at + CHUNK_DIGEST])


class PieceCache:
    def __init__(self, limit: int = PIECE_MEMORY) -> None:
        self.limit = limit
        self.bytes = 0
        self._lru: OrderedDict[PieceKey, memoryview] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: PieceKey) -> bool:
        return key in self._lru

    def get(self, key: PieceKey) -> memoryview | None:
        data = self._lru.get(key)
        if data is not None:
            self._lru.move_to_end(key)
        return data

    def put(self, key: PieceKey, data: memoryview) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._lru[key] = data
        self.bytes += len(data)
        while self.bytes > self.limit and self._lru:
            _, gone = self._lru.popitem(last=False)
            self.bytes -= len(gone)

    def pop(self, key: PieceKey) -> memoryview | None:
        data = self._lru.pop(key, None)
        if data is not None:
            self.bytes -= len(data)
        return data
