"""What the mount's data path passes around: a blob to read, and the bytes of a chunk."""

from __future__ import annotations

from dataclasses import dataclass

# A chunk's bytes: received into a bytearray (ranges.py), read back from the disk cache as
# bytes. Never copied to change type: reads hand out memoryviews into it.
Chunk = bytes | bytearray


@dataclass(frozen=True)
class BlobRef:
    repo: str
    digest: str
    size: int
