"""Remembered file digests, so pushing an unchanged model again does not re-read it.

Keyed by what changes when a file's bytes change under normal use: device, inode, size,
mtime and ctime (in ns). Writing through an editor or `cp` changes mtime or ctime;
this is the same trust `git status` and `rsync` place in file metadata. A stale entry
can only make the registry reject the upload (its digest check) — never store wrong
bytes under a digest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "galleryfs" / "file-digests.json"


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache:
    LIMIT = 50000

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or _path()
        try:
            data = json.loads(self.path.read_text())
            self._data: dict[str, str] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._data = {}
        self._dirty = False

    def get(self, file: Path) -> tuple[str, int] | None:
        st = file.stat()
        digest = self._data.get(_key(st))
        return (digest, st.st_size) if isinstance(digest, str) else None

    def put(self, file: Path, digest: str, size: int) -> None:
        st = file.stat()
        if st.st_size == size:  # the file did not change while it was hashed
            self._data[_key(st)] = digest
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        items = list(self._data.items())[-self.LIMIT:]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(dict(items)))
            os.replace(tmp, self.path)
        except OSError:
            pass  # only costs a re-hash next time
