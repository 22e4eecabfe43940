"""Blob range reads received straight into their buffer, off the trio thread.

httpx parses response bodies in Python on the event loop: h11 copies every received
byte twice more, and in a cold sequential read through the mount the trio thread, the
one that also answers the kernel, spent a large share of its time there (py-spy). The
mount's chunk fetches therefore go through `DirectRanges`: worker threads on the
keep-alive connections of a `DirectTransport`, whose `readinto` receives into the chunk
itself (`recv_into`, GIL released).

A span can also digest what it receives (`unit`): the receiving thread hashes each
`unit` bytes of a piece as they arrive and hands the raw sha256s over with the piece, so
the trio thread compares digests instead of sending every piece to another thread to be
hashed. What the digests are for is the caller's business.

Only the plain answer is taken here: a 206 from the registry itself for exactly the
range asked. Whatever else `direct` names as a fallback is handed to
`RegistryClient.read_range`, which does auth, redirects and retries; the next chunk
tries the direct path again.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .client import RegistryClient
from .direct import DirectTransport, Fallback, expect_range, failures

log = logging.getLogger(__name__)

# (offset, bytes, their sha256 per unit or None) of one piece of a span
Deliver = Callable[[int, bytearray, bytes | None], Awaitable[None]]


@dataclass
class DirectStats:
    direct: int = 0  # ranges received directly
    fallbacks: int = 0  # ranges handed to httpx


class DirectRanges:
    """A `Fetcher` for ChunkReader: (repo, digest, start, end) -> exactly those bytes."""

    def __init__(self, client: RegistryClient, connections: int = 2) -> None:
        self.client = client
        self.stats = DirectStats()
        self.limiter = trio.CapacityLimiter(connections)
        self.transport = DirectTransport(client)

    @property
    def enabled(self) -> bool:
        return self.transport.enabled

    async def __call__(self, repo: str, digest: str, start: int, end: int) -> bytearray:
        if self.enabled and end > start:
            target, headers = self._request(repo, digest, start, end)
            try:
                # Abandoned on cancel (a closed file's prefetch): the thread finishes
                # within the socket timeout and the bytes are dropped.
                data = await trio.to_thread.run_sync(
                    self._get, target, headers, start, end,
                    limiter=self.limiter, abandon_on_cancel=True)
            except Fallback as exc:
                log.debug("direct range read of %s@%s: %s; via httpx", repo, digest, exc)
            else:
                self.stats.direct += 1
                self.client.requests_sent += 1
                self.client.bytes_received += len(data)
                return data
        self.stats.fallbacks += 1
        return await self.client.read_range(repo, digest, start, end)

    async def span(self, repo: str, digest: str, start: int, end: int, piece: int,
                   deliver: Deliver, unit: int = 0) -> int:
        """Bytes [start, end) with one request, handed to `deliver` `piece` bytes at a
        time as they arrive (each delivery waits for the previous one). With `unit`, a
        piece comes with the raw sha256 of each `unit` bytes of it (the last may be
        shorter), computed in the thread that received it; a piece received through
        httpx comes without (None). Returns the offset reached: `end`, or less when the
        registry failed midway (the caller fetches the rest on its own)."""
        reached = start
        if self.enabled:
            target, headers = self._request(repo, digest, start, end)
            stop = threading.Event()
            progress = [start]

            def hand_over(offset: int, data: bytearray, sums: bytes | None
                          ) -> None:  # in the worker thread
                trio.from_thread.run(self._delivered, deliver, offset, data, sums)
                progress[0] = offset + len(data)

            try:
                await trio.to_thread.run_sync(
                    self._span, target, headers, start, end, piece, hand_over, stop, unit,
                    limiter=self.limiter, abandon_on_cancel=True)
            except Fallback as exc:
                log.debug("direct span of %s@%s at %d: %s", repo, digest, progress[0], exc)
            finally:
                stop.set()  # an abandoned thread stops at its next piece
            reached = progress[0]
            if reached == end:
                self.stats.direct += 1
                self.client.requests_sent += 1
                return end
        # What the direct path did not deliver: one piece at a time through httpx.
        self.stats.fallbacks += 1
        while reached < end:
            n = min(piece, end - reached)
            await deliver(reached, await self.client.read_range(repo, digest, reached, reached + n),
                          None)
            reached += n
        return end

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
              hand_over: Callable[[int, bytearray, bytes | None], None],
              stop: threading.Event, unit: int = 0) -> None:
        with self.transport.connection() as conn:
            with failures():
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            expect_range(response, start, end)
            offset = start
            while offset < end:
                if stop.is_set():
                    raise Fallback("given up")
                buf, sums = _receive(response, min(piece, end - offset), unit)
                hand_over(offset, buf, sums)
                offset += len(buf)

    def _get(self, target: str, headers: dict[str, str], start: int, end: int) -> bytearray:
        """The whole range in one buffer: a span of one piece."""
        got: list[bytearray] = []
        self._span(target, headers, start, end, end - start,
                   lambda _offset, data, _sums: got.append(data), threading.Event())
        return got[0]

    def close(self) -> None:
        self.transport.close()


def _receive(response: http.client.HTTPResponse, n: int, unit: int = 0
             ) -> tuple[bytearray, bytes | None]:
    """The next n bytes of the body, received into their own buffer, and with `unit` the
    raw sha256 of each `unit` bytes of it: hashed as they arrive (hashlib releases the
    GIL), while they are still in the CPU's cache, from the buffer handed over."""
    buf = bytearray(n)
    got = 0
    sums: list[bytes] = []
    hashed = 0  # bytes fed to `hasher`, which covers [len(sums) * unit, hashed)
    hasher = hashlib.sha256()
    with failures(), memoryview(buf) as view:
        while got < n:
            k = response.readinto(view[got:])
            if not k:
                break
            got += k
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
