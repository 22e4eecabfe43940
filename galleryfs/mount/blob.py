"""What the mount's data path passes around: a blob to read, the bytes of a chunk, and
what a chunk must hash to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..modelpack import CHUNK_DIGEST, ChunkTable

# A chunk's bytes: received into a bytearray (ranges.py), read back from the disk cache as
# bytes. Never copied to change type: reads hand out memoryviews into it.
Chunk = bytes | bytearray


@dataclass(frozen=True)
class BlobRef:
    """A file's blob as one revision describes it. Its size and table are that revision's
    claims: caches key what they hold by them, so one manifest's claims cannot change the
    bytes another revision's file reads (README, Security and integrity)."""

    repo: str
    digest: str
    size: int
    # The trusted chunk table (from the revision's manifest), if any.
    table: ChunkTable | None = None
    # Where the file shows in the mount (revision and path), for warnings.
    label: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.label or f"{self.repo}@{self.digest}"


# Index entries of chunks checked against a finer table (Expect.identity) start so.
PIECE_IDENTITY = b"GFSP"
_PIECES_DOMAIN = b"galleryfs chunk pieces\0"


@dataclass(frozen=True, slots=True)
class Expect:
    """The raw sha256 of every `piece` bytes of one chunk, in order (one digest when the
    piece is the chunk). Part of the memory cache's key: bytes are found only by readers
    that expect exactly them."""

    piece: int
    digests: bytes

    def matches(self, data: Chunk | memoryview) -> bool:
        """Whether `data` hashes to these digests (in the calling thread: hashlib
        releases the GIL on large buffers). No copy: pieces are memoryview slices."""
        n = len(self.digests) // CHUNK_DIGEST
        if -(-len(data) // self.piece) != n or not len(data):
            return False
        view = memoryview(data)
        try:
            for i in range(n):
                got = hashlib.sha256(view[i * self.piece:(i + 1) * self.piece]).digest()
                if got != self.digests[i * CHUNK_DIGEST:(i + 1) * CHUNK_DIGEST]:
                    return False
        finally:
            view.release()
        return True

    def agrees(self, length: int, unit: int, sums: bytes) -> bool:
        """Whether `length` bytes whose sha256 per `unit` bytes are `sums` (hashed where
        they were received, from the very buffer handed over) are these: a compare."""
        return (unit == self.piece and length > 0
                and -(-length // unit) * CHUNK_DIGEST == len(self.digests)
                and sums == self.digests)

    @property
    def whole(self) -> bytes | None:
        """The chunk's own sha256, when this is one digest for the whole chunk."""
        return self.digests if len(self.digests) == CHUNK_DIGEST else None

    @property
    def identity(self) -> bytes:
        """What the disk cache's index keeps for a chunk checked against these digests,
        so that a reader expecting the same finds it by a compare, not by hashing the
        chunk again: the chunk's sha256 (one digest), else a digest of the piece digests
        (a table finer than the mount's chunk), marked so it is never taken for a
        chunk's own sha256 (`is_piece_identity`)."""
        if len(self.digests) == CHUNK_DIGEST:
            return self.digests
        inner = hashlib.sha256(_PIECES_DOMAIN + self.piece.to_bytes(8, "little") + self.digests)
        return PIECE_IDENTITY + inner.digest()[len(PIECE_IDENTITY):]


def is_piece_identity(stored: bytes) -> bool:
    """Whether a disk cache index entry is an `Expect.identity` of piece digests, not a
    chunk's sha256. A chunk's sha256 starts so once in 2**32: then it is only taken for
    an identity (its index is not lent as a table; a reader hashes the chunk)."""
    return stored[:len(PIECE_IDENTITY)] == PIECE_IDENTITY
