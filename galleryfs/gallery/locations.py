"""Which repository of a registry is known to hold a blob.

Pushes consult it to mount a blob across repositories instead of sending it again
(Docker keeps the same kind of record). It is only a hint: a stale entry costs one
failed mount attempt, after which the blob is uploaded.
"""

from __future__ import annotations

from pathlib import Path

from .hintfile import HintFile, cache_path


class BlobLocations(HintFile):
    def __init__(self, path: Path | None = None) -> None:
        super().__init__(path or cache_path("blob-locations.json"))

    def find(self, host: str, digest: str) -> str | None:
        return self._get(f"{host} {digest}")

    def record(self, host: str, digest: str, repo: str) -> None:
        self._set(f"{host} {digest}", repo)
