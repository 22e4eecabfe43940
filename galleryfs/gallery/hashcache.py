"""Remembered file digests, so pushing an unchanged model again does not re-read it.

Keyed by what changes when a file's bytes change under normal use: device, inode, size,
mtime and ctime (in ns) — the same trust `git status` and `rsync` place in file
metadata. A stale entry can only make the registry reject the upload (it checks the
digest of what it receives), never store wrong bytes under a digest.
"""

from __future__ import annotations

import os
from pathlib import Path

from .hintfile import HintFile, cache_path


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache(HintFile):
    LIMIT = 50000

    def __init__(self, path: Path | None = None) -> None:
        super().__init__(path or cache_path("file-digests.json"))

    def get(self, file: Path) -> tuple[str, int] | None:
        st = file.stat()
        digest = self._get(_key(st))
        return (digest, st.st_size) if digest else None

    def put(self, file: Path, digest: str, size: int, before: os.stat_result | None = None
            ) -> None:
        """Remember the digest, unless the file changed while it was hashed: `before` is
        its stat from before the hash (a push may also upload it meanwhile)."""
        st = file.stat()
        if st.st_size != size or before is not None and _key(before) != _key(st):
            return
        self._set(_key(st), digest)
