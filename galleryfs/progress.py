"""Byte progress on a terminal (tqdm), silent otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, label: str, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._bar: Any = None
        if self.enabled:
            # Imported here: start-up time that a quiet or piped run never needs.
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=False)

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
