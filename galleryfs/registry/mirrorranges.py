"""The mount's range reads through mirrors: each available mirror's `DirectRanges`, then
the origin's. The policy (order, no credentials, skipping a failed mirror) is mirrors.py's.

Bytes of a range are not checked here (the mount's chunk tables are): a chunk that fails
its check is reported back with `distrust`, which skips the mirrors that served the blob
lately, so the reader's next fetch of it comes from the next source.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from .mirrors import FAILURES, Mirror, Mirrors
from .ranges import Deliver, DirectRanges, DirectStats, Gate

log = logging.getLogger(__name__)

# Blobs whose serving mirrors are remembered (for `distrust`); the oldest are forgotten.
REMEMBERED_BLOBS = 4096


class MirroredRanges:
    """A `Fetcher` and `SpanFetcher` for ChunkReader, like `DirectRanges`."""

    def __init__(self, origin: DirectRanges, mirrors: Mirrors) -> None:
        self.origin = origin
        self.mirrors = mirrors
        self.ranges = {m: DirectRanges(m.client) for m in mirrors.mirrors}
        self._served: OrderedDict[str, set[Mirror]] = OrderedDict()

    @property
    def stats(self) -> DirectStats:
        return self.origin.stats

    @property
    def mirror_direct(self) -> int:
        return sum(r.stats.direct for r in self.ranges.values())

    async def __call__(self, repo: str, digest: str, start: int, end: int) -> bytearray:
        for mirror in self.mirrors.available():
            try:
                data = await self.ranges[mirror](repo, digest, start, end)
            except FAILURES as exc:
                self.mirrors.failed(mirror, f"{repo}@{digest}[{start}:{end}]", exc)
                continue
            self._remember(digest, mirror)
            return data
        return await self.origin(repo, digest, start, end)

    async def span(self, repo: str, digest: str, start: int, end: int, piece: int,
                   deliver: Deliver, unit: int = 0, gate: Gate | None = None) -> int:
        """As `DirectRanges.span`; a mirror failing midway leaves the rest, from the
        offset it reached, to the next source (one its gate stopped: nothing)."""
        reached = start

        async def tracked(offset: int, data: bytearray, sums: bytes | None) -> None:
            nonlocal reached
            await deliver(offset, data, sums)
            reached = offset + len(data)

        for mirror in self.mirrors.available():
            try:
                if reached < end:
                    self._remember(digest, mirror)
                    return await self.ranges[mirror].span(repo, digest, reached, end, piece,
                                                          tracked, unit, gate)
            except FAILURES as exc:
                self.mirrors.failed(mirror, f"{repo}@{digest}[{reached}:{end}]", exc)
                continue
            return end
        if reached < end:
            return await self.origin.span(repo, digest, reached, end, piece, tracked, unit, gate)
        return end

    def distrust(self, digest: str, reason: str) -> bool:
        """Bytes of the blob failed their check: skip the mirrors that served it lately.
        True when there were any (a fetch again may come from a source that tells the
        truth); False when the origin's own bytes are wrong."""
        mirrors = self._served.pop(digest, set())
        for mirror in mirrors:
            self.mirrors.failed(mirror, digest, reason)
        return bool(mirrors)

    def _remember(self, digest: str, mirror: Mirror) -> None:
        self._served.setdefault(digest, set()).add(mirror)
        self._served.move_to_end(digest)
        while len(self._served) > REMEMBERED_BLOBS:
            self._served.popitem(last=False)

    def close(self) -> None:
        for ranges in self.ranges.values():
            ranges.close()
        self.origin.close()
