"""`--timeout` as a stall deadline: how long galleryfs waits for a registry that has
stopped sending, whatever the operation's size.

A total-time bound would fail a healthy 10 GiB download; a bound per socket receive
(httpx's read timeout, a socket timeout) lets a registry sending one byte a second hold
an operation for days, and multiplies with every retry. So one rule, for every wait on
the registry (README, "Failure behaviour"):

    an operation fails when `timeout` seconds pass in which fewer than
    `MIN_PROGRESS` bytes (64 KiB) of it went over the network, retries included.

A frozen registry fails an operation `timeout` after it started or last made progress;
a trickling one the same; a healthy transfer of any size never does.

A `Watchdog` counts the bytes of one operation (from any thread: the direct receive
threads mark it too) and keeps the deadline of every scope that `watch`es it at the
last progress plus `timeout`. Marks from worker threads reach the trio thread at most
`1 / PUSH` times per `timeout`, so a stalled operation fails between `timeout` and
`(1 + PUSH) * timeout` after its last progress.

`current()` is the watchdog of the operation running in this task (a contextvar): the
registry client's retry loop reuses it rather than start a deadline of its own, so a
request made on behalf of a mount read or a pull counts against that operation's
deadline, and its bytes as that operation's progress.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ..errors import RegistryUnavailable

MIN_PROGRESS = 64 << 10
# Deadline pushes per timeout, at most: the slack of the deadline, as a fraction of it.
PUSH = 0.1

_current: contextvars.ContextVar[Watchdog | None] = contextvars.ContextVar(
    "galleryfs_watchdog", default=None)


def current() -> Watchdog | None:
    return _current.get()


def mark(n: int) -> None:
    """`n` bytes of the current operation went over the network (trio thread)."""
    dog = _current.get()
    if dog is not None:
        dog.mark(n)


class Watchdog:
    """The stall deadline of one operation (and of everything done on its behalf)."""

    def __init__(self, timeout: float, what: str, *, parent: Watchdog | None = None,
                 min_progress: int = MIN_PROGRESS) -> None:
        self.timeout = timeout
        self.what = what
        self.parent = parent
        self.min_progress = min_progress
        self.received = 0
        # Watchdogs that count this one's bytes as their own progress meanwhile (`lend`).
        self._borrowers: tuple[Watchdog, ...] = ()
        self._pending = 0
        self._pushed = time.monotonic()
        self._scopes: set[trio.CancelScope] = set()
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()

    def mark(self, n: int) -> None:
        """`n` more bytes arrived (or went out). Any thread; counts lost to a race
        between threads only delay a push."""
        if n <= 0:
            return
        self.received += n
        self._pending += n
        if self.parent is not None:
            self.parent.mark(n)
        for other in self._borrowers:
            other.mark(n)
        if self._pending < self.min_progress:
            return
        self._pending = 0
        now = time.monotonic()
        if now - self._pushed < self.timeout * PUSH:
            return
        self._pushed = now
        if threading.get_ident() == self._trio_thread:
            self._push()
        else:
            try:
                self._token.run_sync_soon(self._push)
            except trio.RunFinishedError:
                pass

    def _push(self) -> None:
        deadline = trio.current_time() + self.timeout * (1 + PUSH)
        for scope in self._scopes:
            scope.deadline = deadline

    @contextmanager
    def watch(self) -> Iterator[trio.CancelScope]:
        """A scope cancelled once this operation stalls (see the module docstring),
        that makes this watchdog `current()` inside. The caller decides what a stall
        means (`stalled` for the usual error)."""
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeout * (1 + PUSH))
        token = _current.set(self)
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)
            _current.reset(token)

    @contextmanager
    def lend(self, other: Watchdog | None) -> Iterator[None]:
        """While in the block, this watchdog's progress is `other`'s too: an operation
        queued behind transfers (for a connection) is not stalled while they move."""
        if other is None or other is self:
            yield
            return
        self._borrowers = (*self._borrowers, other)
        try:
            yield
        finally:
            self._borrowers = tuple(b for b in self._borrowers if b is not other)

    def stalled(self) -> RegistryUnavailable:
        if self.received:
            return RegistryUnavailable(
                f"{self.what}: the registry stalled (less than {self.min_progress >> 10} KiB "
                f"in {self.timeout:g}s)")
        return RegistryUnavailable(f"{self.what}: no answer from the registry within "
                                   f"{self.timeout:g}s")


@contextmanager
def deadline(timeout: float, what: str) -> Iterator[Watchdog]:
    """Run the block under the current operation's watchdog, or under a new one that
    raises `RegistryUnavailable` when the block stalls."""
    dog = _current.get()
    if dog is not None and dog._scopes:
        yield dog
        return
    # (A task spawned from a watched one inherits its watchdog, but not its scope.)
    dog = Watchdog(timeout, what)
    with dog.watch() as scope:
        yield dog
    if scope.cancelled_caught:
        raise dog.stalled()
