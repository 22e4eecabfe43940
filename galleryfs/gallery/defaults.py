"""What the gallery operations share: the tag a reference without one means, how many
blobs move at once, and the progress bar a caller hands in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

DEFAULT_TAG = "latest"
CONCURRENCY = 4

# Bytes moved so far, reported as they move (negative: taken back when an upload restarts).
Bar = Callable[[int], None]
# (total bytes, label) -> a bar; one with a `close()` is closed when the operation ends.
ProgressFactory = Callable[[int, str], Bar]


@contextmanager
def open_bar(progress: ProgressFactory | None, total: int, label: str) -> Iterator[Bar | None]:
    bar = progress(total, label) if progress else None
    try:
        yield bar
    finally:
        close = getattr(bar, "close", None)
        if close is not None:
            close()
