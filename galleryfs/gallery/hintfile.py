"""A small JSON map kept under the user's cache dir, for hints that are safe to lose.

Both users (blob locations, file digests) only save work: a missing, stale or unwritable
file costs a repeated upload or hash, never a wrong result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_path(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "galleryfs" / name


class HintFile:
    LIMIT = 20000  # newest entries kept

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = json.loads(self.path.read_text())
            self._data: dict[str, str] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._data = {}
        self._dirty = False

    def _get(self, key: str) -> str | None:
        value = self._data.get(key)
        return value if isinstance(value, str) else None

    def _set(self, key: str, value: str) -> None:
        if self._data.get(key) != value:
            self._data.pop(key, None)  # re-insert: dict order is the recency order
            self._data[key] = value
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
            pass
        self._dirty = False
