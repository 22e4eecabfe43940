"""Which repository of a registry is known to hold a blob.

Pushes consult it to mount a blob across repositories instead of sending it again
(Docker keeps the same kind of record). It is only a hint: a stale entry costs one
failed mount attempt, after which the blob is uploaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "galleryfs" / "blob-locations.json"


class BlobLocations:
    LIMIT = 20000

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or _path()
        try:
            data = json.loads(self.path.read_text())
            self._data: dict[str, str] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._data = {}
        self._dirty = False

    def find(self, host: str, digest: str) -> str | None:
        return self._data.get(f"{host} {digest}")

    def record(self, host: str, digest: str, repo: str) -> None:
        key = f"{host} {digest}"
        if self._data.get(key) != repo:
            self._data.pop(key, None)
            self._data[key] = repo
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
            pass  # a hint cache that cannot be written only costs future uploads
