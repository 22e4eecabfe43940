"""Remembered file digests and chunk tables, so pushing an unchanged model again does
not re-read it.

Keyed by what changes when a file's bytes change under normal use: device, inode, size,
mtime and ctime (in ns) — the same trust `git status` and `rsync` place in file
metadata. A stale digest can only make the registry reject the upload (it checks the
digest of what it receives), never store wrong bytes under a digest. A stale chunk table
would be pushed as it is (nobody checks a table at push): it is kept with the digest it
was computed with and used only beside that very digest, so it is exactly as fresh as
the digest, and a wrong one makes reads fail (the mount checks every chunk against it),
never serve wrong bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from ..modelpack import ChunkTable
from .hintfile import HintFile, cache_path


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _table_key(key: str, chunk_size: int) -> str:
    return f"{key}:chunks:{chunk_size}"


class HashCache(HintFile):
    LIMIT = 50000

    def __init__(self, path: Path | None = None) -> None:
        super().__init__(path or cache_path("file-digests.json"))

    def get(self, file: Path) -> tuple[str, int] | None:
        st = file.stat()
        digest = self._get(_key(st))
        return (digest, st.st_size) if digest else None

    def get_table(self, file: Path, digest: str, chunk_size: int) -> ChunkTable | None:
        """The file's chunk table in `chunk_size` chunks, if remembered with `digest`."""
        st = file.stat()
        entry = self._get(_table_key(_key(st), chunk_size))
        if entry is None:
            return None
        remembered, _, body = entry.partition(" ")
        if remembered != digest:
            return None
        try:
            table = ChunkTable(chunk_size, base64.b64decode(body, validate=True))
        except (binascii.Error, ValueError):
            return None  # a damaged cache entry: the file is hashed again
        return table if table.fits(st.st_size) else None

    def put(self, file: Path, digest: str, size: int, before: os.stat_result | None = None,
            table: ChunkTable | None = None) -> None:
        """Remember the digest (and the chunk table), unless the file changed while it
        was hashed: `before` is its stat from before the hash (a push may also upload
        it meanwhile)."""
        st = file.stat()
        if st.st_size != size or before is not None and _key(before) != _key(st):
            return
        self._set(_key(st), digest)
        if table is not None:
            self._set(_table_key(_key(st), table.chunk_size),
                      f"{digest} {base64.b64encode(table.digests).decode()}")
