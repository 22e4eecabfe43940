"""Blob range reads received straight into their buffer, off the trio thread.

httpx parses response bodies in Python on the event loop: h11 copies every received
byte twice more, and in a cold sequential read through the mount the trio thread, the
one that also answers the kernel, spent a large share of its time there (py-spy). The
mount's chunk fetches therefore go through `DirectRanges`: worker threads on the
keep-alive connections of a `DirectTransport`, whose `readinto` receives into the chunk
itself (`recv_into`, GIL released).

A span can also digest what it receives (`unit`): the receiving thread hashes each
`unit` bytes of a piece as they arrive and hands the raw sha256s over with the piece, so
the trio thread only compares digests. What the digests are for is the caller's
business. A gated span (`Gate`) receives only as far as its stream has claimed, so one
request can serve a whole stream.

Only the plain answer is taken here: a 206 from the registry itself for exactly the
range asked. Whatever else `direct` names as a fallback is handed to
`RegistryClient.read_range`, which does auth, redirects and retries; the next chunk
tries the direct path again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import logging
import math
import socket
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import first_error
from . import deadline
from .client import RegistryClient
from .deadline import MIN_PROGRESS, Watchdog
from .direct import DirectTransport, Fallback, expect_range, failures

log = logging.getLogger(__name__)

# A receive that took less than this doubles the next one's size (see `_receive`).
FAST_READ = 0.05
# Pieces of a span received (or being received) and not yet delivered, at most: two, so
# the next piece is received while the trio thread takes the last (the socket holds what
# the registry sends meanwhile). With one, G1 and G2 ran slower (scripts/bench,
# alternating: G1 median 402 against 431 MB/s, G2 1.43 against 1.25 s); two had raised the
# daemon's peak RSS past G9's bound until the chunk buffers came from one malloc arena
# (mount/tuning.py). Fewer for pieces so large that two would take more than AHEAD_BYTES
# (--chunk-size allows 256 MiB): these buffers are outside the memory cache's budget.
AHEAD = 2
AHEAD_BYTES = 8 << 20
# Seconds between looks at a span's abort while its thread waits for room.
ROOM_POLL = 0.1

# (offset, bytes, their sha256 per unit or None) of one piece of a span
Deliver = Callable[[int, bytearray, bytes | None], Awaitable[None]]


@dataclass
class DirectStats:
    direct: int = 0  # ranges received directly
    fallbacks: int = 0  # ranges handed to httpx
    cut: int = 0  # gated spans ended before the end of their range
    discarded: int = 0  # bytes those left unread in their connection


class Gate(Protocol):
    """How far a span may be received (mount/fetch.py `SpanGate`)."""

    until: int
    shut: bool

    def wait(self, offset: int) -> bool:
        """In the receiving thread: True once bytes at `offset` may be received, False
        when they never will be (the request ends there)."""
        ...

    def close(self) -> None:
        """No further: the request ends where the gate stands."""
        ...


class DirectRanges:
    """A `Fetcher` for ChunkReader: (repo, digest, start, end) -> exactly those bytes."""

    def __init__(self, client: RegistryClient, connections: int = 2) -> None:
        self.client = client
        self.stats = DirectStats()
        self.limiter = trio.CapacityLimiter(connections)
        self.transport = DirectTransport(client)
        # Gated spans running: each holds a connection for as long as its stream goes on,
        # so a request that finds none free shuts their gates (they end at what they
        # claimed) rather than wait for a stream's end.
        self._gated: dict[Gate, None] = {}  # in the order they started
        # Every byte received here: what a request queued for a connection waits on.
        self.moving: Watchdog | None = None

    @property
    def enabled(self) -> bool:
        return self.transport.enabled

    async def __call__(self, repo: str, digest: str, start: int, end: int) -> bytearray:
        if self.enabled and end > start:
            target, headers = self._request(repo, digest, start, end)
            abort = _Abort(self._watchdogs())
            try:
                # Abandoned on cancel (a closed file's prefetch, a stall deadline): its
                # connection is shut, so the thread ends at once and the bytes are dropped.
                async with self._connection():
                    data = await trio.to_thread.run_sync(
                        self._get, target, headers, start, end, abort,
                        abandon_on_cancel=True)
            except Fallback as exc:
                log.debug("direct range read of %s@%s: %s; via httpx", repo, digest, exc)
            else:
                self.stats.direct += 1
                self.client.requests_sent += 1
                self.client.bytes_received += len(data)
                return data
            finally:
                abort.fire()
        self.stats.fallbacks += 1
        return await self.client.read_range(repo, digest, start, end)

    async def span(self, repo: str, digest: str, start: int, end: int, piece: int,
                   deliver: Deliver, unit: int = 0, gate: Gate | None = None) -> int:
        """Bytes [start, end) with one request, handed to `deliver` `piece` bytes at a
        time as they arrive (each delivery waits for the previous one). With `unit`, a
        piece comes with the raw sha256 of each `unit` bytes of it (the last may be
        shorter), computed in the thread that received it; a piece received through
        httpx comes without (None). With a `gate`, only bytes below its `until` are
        received, as it moves: the request ends early (the rest never read) once the
        gate says no more. Returns the offset reached: `end` (or where the gate
        stopped it), or less when the registry failed midway (the caller fetches the
        rest on its own)."""
        reached = start
        if gate is not None and gate.shut:
            # Its stream moved on before it started: only what is claimed.
            end = min(end, gate.until)
            if end <= start:
                return start
        if self.enabled:
            target, headers = self._request(repo, digest, start, end)
            abort = _Abort(self._watchdogs())
            progress = [start]
            # The receiving thread posts each piece rather than wait in a call into the
            # trio thread (which also answers the kernel); it starts receiving a piece
            # only while fewer than `room` are received and undelivered.
            token = trio.lowlevel.current_trio_token()
            send, received = trio.open_memory_channel[tuple[int, bytearray, bytes | None]](
                math.inf)
            room = threading.Semaphore(max(1, min(AHEAD, AHEAD_BYTES // piece)))

            def post(item: tuple[int, bytearray, bytes | None]) -> None:  # trio thread
                with contextlib.suppress(trio.ClosedResourceError):
                    send.send_nowait(item)

            def hand_over(offset: int, data: bytearray, sums: bytes | None
                          ) -> None:  # in the worker thread
                try:
                    token.run_sync_soon(post, (offset, data, sums))
                except trio.RunFinishedError:
                    raise Fallback("the mount is ending") from None

            def wait_room(offset: int) -> bool:  # in the worker thread
                if gate is not None and not gate.wait(offset):
                    return False
                while not room.acquire(timeout=ROOM_POLL):
                    if abort.stop.is_set():
                        raise Fallback("given up")
                return True

            async def take_all() -> None:
                async for offset, data, sums in received:
                    await self._delivered(deliver, offset, data, sums)
                    progress[0] = offset + len(data)
                    room.release()

            unread = [0]
            failure: Fallback | None = None
            finished = False
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take_all)
                    try:
                        try:
                            async with self._connection():
                                if gate is not None:
                                    self._gated[gate] = None
                                try:
                                    await trio.to_thread.run_sync(
                                        self._span, target, headers, start, end, piece,
                                        hand_over, abort, unit, wait_room, unread,
                                        abandon_on_cancel=True)
                                finally:
                                    if gate is not None:
                                        self._gated.pop(gate, None)
                        except Fallback as exc:
                            # What was received before it is delivered all the same.
                            failure = exc
                    finally:
                        # Every piece posted is queued by now (posts run in order, before
                        # the thread's return is reported): delivered next.
                        send.close()
                finished = True
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            finally:
                abort.fire()  # an abandoned thread stops now, not at its next piece
                if gate is not None and not finished:
                    gate.close()  # and one waiting at its gate
                # Bytes the registry sent that the gate left unread still crossed the
                # network: counted as received, and as discarded (the registry's own
                # send buffer is not seen from here: this is a lower bound).
                self.client.bytes_received += unread[0]
                self.stats.discarded += unread[0]
            reached = progress[0]
            if failure is None:
                self.stats.direct += 1
                self.client.requests_sent += 1
                if reached < end:
                    self.stats.cut += 1  # its gate ended it: nothing more was claimed
                return reached
            log.debug("direct span of %s@%s at %d: %s", repo, digest, reached, failure)
        if gate is not None:
            # Through httpx, only what its stream has claimed: the gate shuts, so the
            # stream claims its next chunks into a new span.
            gate.close()
            end = min(end, gate.until)
        # What the direct path did not deliver: one piece at a time through httpx.
        self.stats.fallbacks += 1
        while reached < end:
            n = min(piece, end - reached)
            await deliver(reached, await self.client.read_range(repo, digest, reached, reached + n),
                          None)
            reached += n
        return end

    def _watchdogs(self) -> tuple[Watchdog, ...]:
        """What a receive thread marks: `moving`, and the current operation's watchdog."""
        current = deadline.current()
        return (self._moving(),) if current is None else (self._moving(), current)

    def _moving(self) -> Watchdog:
        if self.moving is None:
            self.moving = Watchdog(self.client.options.timeout, "direct range reads")
        return self.moving

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[None]:
        """One of the `connections` threads. While queued for it, the transfers that
        hold them count as the waiting operation's progress: healthy long transfers
        (a whole blob verified, a long span) must not stall the requests behind them."""
        make_room(self.limiter, self._gated)
        with self._moving().lend(deadline.current()):
            await self.limiter.acquire()
        try:
            yield
        finally:
            self.limiter.release()

    async def _delivered(self, deliver: Deliver, offset: int, data: bytearray,
                         sums: bytes | None) -> None:
        self.client.bytes_received += len(data)
        await deliver(offset, data, sums)

    def _request(self, repo: str, digest: str, start: int, end: int
                 ) -> tuple[str, dict[str, str]]:
        """Target and headers of the Range GET of bytes [start, end) of a blob."""
        target = f"/v2/{repo}/blobs/{digest}"
        return target, self.transport.headers("GET", target,
                                              {"Range": f"bytes={start}-{end - 1}"})

    # ---- in a worker thread ------------------------------------------------------

    def _span(self, target: str, headers: dict[str, str], start: int, end: int, piece: int,
              hand_over: Callable[[int, bytearray, bytes | None], None], abort: _Abort,
              unit: int = 0, wait_room: Callable[[int], bool] | None = None,
              unread: list[int] | None = None) -> None:
        try:
            with self.transport.connection() as conn:
                abort.watch(conn)
                with failures():
                    conn.request("GET", target, headers=headers)
                    response = conn.getresponse()
                expect_range(response, start, end)
                offset = start
                while offset < end:
                    if abort.stop.is_set():
                        raise Fallback("given up")
                    if wait_room is not None and not wait_room(offset):
                        # The gate ends the request here: the rest of the answer is never
                        # read, and the connection is closed rather than pooled.
                        if unread is not None:
                            unread[0] = _unread(conn)
                        raise _GateShut
                    buf, sums = _receive(response, min(piece, end - offset), abort.watchdogs,
                                         unit)
                    hand_over(offset, buf, sums)
                    offset += len(buf)
                abort.release()
        except _GateShut:
            pass

    def _get(self, target: str, headers: dict[str, str], start: int, end: int,
             abort: _Abort) -> bytearray:
        """The whole range in one buffer: a span of one piece."""
        got: list[bytearray] = []
        self._span(target, headers, start, end, end - start,
                   lambda _offset, data, _sums: got.append(data), abort)
        return got[0]

    def close(self) -> None:
        self.transport.close()


def make_room(limiter: trio.CapacityLimiter, holders: Iterable[Gate | None]) -> None:
    """Someone is about to queue for one of `limiter`'s slots, whose `holders` (oldest
    first; None: a holder without a gate, which ends on its own) may be streams'
    requests that would hold it for a whole file: unless a slot is free or about to come
    free for the one asking (the queue is FIFO), the oldest running request ends at what
    its stream has claimed (the stream starts a new one, queued like this one)."""
    if limiter.available_tokens:
        return
    gates = list(holders)
    ending = sum(gate is None or gate.shut for gate in gates)
    if ending > limiter.statistics().tasks_waiting:
        return
    for gate in gates:
        if gate is not None and not gate.shut:
            gate.close()
            return


class _GateShut(Exception):
    """A gated span's thread stops at its gate (not a failure)."""


class _Abort:
    """How the trio side stops a receive thread it no longer waits for: a flag checked
    between pieces, and a shutdown of the connection for a thread blocked in a receive
    (a socket timeout bounds each receive, not a body trickled a byte at a time). Also
    the watchdogs the thread's bytes count for."""

    def __init__(self, watchdogs: tuple[Watchdog, ...]) -> None:
        self.watchdogs = watchdogs
        self.stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def watch(self, conn: http.client.HTTPConnection) -> None:  # in the worker thread
        with self._lock:
            self._conn = conn
        if self.stop.is_set():
            raise Fallback("given up")

    def release(self) -> None:  # in the worker thread, its answer read to the end
        """The connection may go back to the pool, unless `fire` shut it meanwhile."""
        with self._lock:
            self._conn = None
            if self.stop.is_set():
                raise Fallback("given up")

    def fire(self) -> None:
        """Stop the thread; a no-op once it released its connection."""
        with self._lock:
            self.stop.set()
            conn, self._conn = self._conn, None
            sock = conn.sock if conn is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# bytearray(n) zeroes its n bytes first: a memset of every byte received (about a tenth
# of a CPU-second per GiB, scripts/bench G1) for bytes about to be overwritten. Python's
# C API makes the bytearray without initialising it; `_receive` hands a buffer on only
# once every byte of it was received, so nothing it held before is ever read.
_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype = ctypes.py_object
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def _unread(conn: http.client.HTTPConnection) -> int:
    """Bytes received by the kernel for the connection and not read (FIONREAD)."""
    sock = conn.sock
    if sock is None:
        return 0
    try:
        got = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(got, sys.byteorder, signed=True)


def _unfilled(n: int) -> bytearray:
    """A bytearray of n bytes, not initialised: fill every byte before reading any."""
    buf: bytearray = _new_bytearray(None, n)
    return buf


def _receive(response: http.client.HTTPResponse, n: int,
             watchdogs: tuple[Watchdog, ...] = (), unit: int = 0
             ) -> tuple[bytearray, bytes | None]:
    """The next n bytes of the body, received into their own buffer, and with `unit` the
    raw sha256 of each `unit` bytes of it: hashed as they arrive (hashlib releases the
    GIL), while they are still in the CPU's cache, from the buffer handed over."""
    buf = _unfilled(n)
    got = 0
    sums: list[bytes] = []
    hashed = 0  # bytes fed to `hasher`, which covers [len(sums) * unit, hashed)
    hasher = hashlib.sha256()
    step = MIN_PROGRESS
    with failures(), memoryview(buf) as view:
        while got < n:
            # A buffered readinto returns only once its buffer is full: a whole chunk
            # received slowly but steadily (less than a chunk per timeout) would count as a
            # stall. So MIN_PROGRESS at first, doubled while reads come back fast: a fast
            # link gets large reads (64 KiB ones all along cost G1 a third of its speed).
            started = time.monotonic()
            k = response.readinto(view[got:got + step])
            if step < n and time.monotonic() - started < FAST_READ:
                step *= 2
            if not k:
                break
            got += k
            for dog in watchdogs:
                dog.mark(k)
            while unit and hashed < got:
                upto = min(got, (len(sums) + 1) * unit)
                hasher.update(view[hashed:upto])
                hashed = upto
                if hashed == (len(sums) + 1) * unit or hashed == n:
                    sums.append(hasher.digest())
                    hasher = hashlib.sha256()
    if got != n:
        raise Fallback(f"short body: {got} of {n} bytes")
    return buf, b"".join(sums) if unit else None
