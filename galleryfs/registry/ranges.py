"""Blob range reads received straight into their buffer, off the trio thread.

httpx parses response bodies in Python on the event loop: h11 copies every received
byte twice more, and in a cold sequential read through the mount the trio thread spent
about 40% of its time there (py-spy), the thread that also answers the kernel. The
mount's chunk fetches therefore go through `DirectRanges`: worker threads on stdlib
`http.client` keep-alive connections, whose `readinto` receives into the chunk itself
(`recv_into`, GIL released).

Only the plain case takes this path: a 206 answer from the registry itself, sent with
the credentials the httpx client already negotiated. Anything else (no credentials yet,
a 401 from an expired token, a redirect such as Harbor's to S3, an error status, a
transport failure, a proxy configured in the environment) is handed to
`RegistryClient.read_range`, which does auth, redirects and retries; the next chunk
tries the direct path again.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from .client import DirectEndpoint, RegistryClient, no_proxy_for

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Fallback(Exception):
    """The direct path cannot answer this request; httpx will."""


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
        self.enabled = no_proxy_for(client.base)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._endpoint = DirectEndpoint(client)

    async def __call__(self, repo: str, digest: str, start: int, end: int) -> bytearray:
        if self.enabled and end > start:
            path, headers = self._request(repo, digest, start, end)
            try:
                # Abandoned on cancel (a closed file's prefetch): the thread finishes
                # within the socket timeout and the bytes are dropped.
                data = await trio.to_thread.run_sync(
                    self._get, path, headers, start, end,
                    limiter=self.limiter, abandon_on_cancel=True)
            except _Fallback as exc:
                log.debug("direct range read of %s@%s: %s; via httpx", repo, digest, exc)
            else:
                self.stats.direct += 1
                self.client.requests_sent += 1
                self.client.bytes_received += len(data)
                return data
        self.stats.fallbacks += 1
        return await self.client.read_range(repo, digest, start, end)

    async def span(self, repo: str, digest: str, start: int, end: int, piece: int,
                   deliver: Callable[[int, bytearray], Awaitable[None]]) -> int:
        """Bytes [start, end) with one request, handed to `deliver` `piece` bytes at a
        time as they arrive (each delivery waits for the previous one). Returns the
        offset reached: `end`, or less when the registry failed midway (the caller
        fetches the rest on its own)."""
        reached = start
        if self.enabled:
            path, headers = self._request(repo, digest, start, end)
            stop = threading.Event()
            progress = [start]

            def hand_over(offset: int, data: bytearray) -> None:  # in the worker thread
                trio.from_thread.run(self._delivered, deliver, offset, data)
                progress[0] = offset + len(data)

            try:
                await trio.to_thread.run_sync(
                    self._span, path, headers, start, end, piece, hand_over, stop,
                    limiter=self.limiter, abandon_on_cancel=True)
            except _Fallback as exc:
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
            await deliver(reached, await self.client.read_range(repo, digest, reached, reached + n))
            reached += n
        return end

    async def _delivered(self, deliver: Callable[[int, bytearray], Awaitable[None]],
                         offset: int, data: bytearray) -> None:
        self.client.bytes_received += len(data)
        await deliver(offset, data)

    def _request(self, repo: str, digest: str, start: int, end: int
                 ) -> tuple[str, dict[str, str]]:
        """Path and headers of the Range GET of bytes [start, end) of a blob."""
        path = f"/v2/{repo}/blobs/{digest}"
        headers = {"Range": f"bytes={start}-{end - 1}", "User-Agent": "galleryfs"}
        # Before any challenge, send nothing: httpx finds out what is needed.
        if self.client.auth.scheme is not None:
            authorization = self.client.auth.authorization(
                httpx.Request("GET", self.client.base + path))
            if authorization:
                headers["Authorization"] = authorization
        return path, headers

    # ---- in a worker thread ------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._endpoint.connect()

    def _span(self, path: str, headers: dict[str, str], start: int, end: int, piece: int,
              hand_over: Callable[[int, bytearray], None], stop: threading.Event) -> None:
        conn = self._connection()
        try:
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _Fallback(f"{type(exc).__name__}: {exc}") from None
            _check_range(response, start, end)
            offset = start
            while offset < end:
                if stop.is_set():
                    raise _Fallback("given up")
                buf = _receive(response, min(piece, end - offset))
                hand_over(offset, buf)
                offset += len(buf)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)

    def _get(self, path: str, headers: dict[str, str], start: int, end: int) -> bytearray:
        """The whole range in one buffer: a span of one piece."""
        got: list[bytearray] = []
        self._span(path, headers, start, end, end - start,
                   lambda _offset, data: got.append(data), threading.Event())
        return got[0]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _check_range(response: http.client.HTTPResponse, start: int, end: int) -> None:
    m = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range") or "")
    if (response.status != 206 or m is None or int(m.group(1)) != start
            or int(m.group(2)) != end - 1 or response.length != end - start):
        raise _Fallback(f"HTTP {response.status}")


def _receive(response: http.client.HTTPResponse, n: int) -> bytearray:
    """The next n bytes of the body, received into their own buffer."""
    buf = bytearray(n)
    got = 0
    try:
        with memoryview(buf) as view:
            while got < n:
                k = response.readinto(view[got:])
                if not k:
                    break
                got += k
    except (OSError, http.client.HTTPException) as exc:
        raise _Fallback(f"{type(exc).__name__}: {exc}") from None
    if got != n:
        raise _Fallback(f"short body: {got} of {n} bytes")
    return buf
