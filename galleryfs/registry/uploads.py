"""Large blob uploads sent by the kernel (`sendfile`), off the trio thread, and sent
while they are hashed.

Through httpx, every byte of an upload is read into Python and passed through h11 and
the trio socket on the event loop. `DirectUploads` sends a large file's bytes from a
worker thread on a stdlib `http.client` connection with `socket.sendfile` (zero-copy
over plain HTTP; TLS sockets fall back to sending in pieces, still off the event loop).

A push first needs each file's digest (the manifest names blobs by digest, and a blob
the registry has already is not sent), and hashing a large file cold takes a good part
of the time its upload does. `upload_hashing` therefore streams a file whose digest is
not known yet into an upload session (one `PATCH`) while another thread hashes it; the
session is closed with `PUT ?digest=` once the hash is known. If the hash shows that the
registry has the blob already (or can mount it), the upload is abandoned. `upload` (the
digest known) sends the same way, without the hash.

The `PATCH` body is chunked so that it can end early between two pieces: the registry
then answers with the session's current URL, and Distribution takes no other once bytes
arrived (a DELETE by the first URL is refused, and the bytes stay until its purge of old
uploads, a week by default). An abandoned, failed or cancelled upload drops its session
by that URL.

The session is opened (`POST`) through httpx, which negotiates credentials; the direct
`PATCH` goes over a `DirectTransport` with the header the httpx client would send.
Anything but the plain answer (a 202 with the session's next URL), and whatever else
`direct` names as a fallback, hands the blob to `RegistryClient.upload_blob`, which
starts a new session with auth, retries and chunked `PATCH`es. The registry checks the
digest of what it receives, so a half-sent body can never be stored under a digest.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urljoin

import trio

from .. import digest as digests
from ..errors import DigestMismatch, RegistryError, first_error
from .client import DROP_TIMEOUT, ProgressFn, RegistryClient
from .direct import DirectTransport, Fallback, expect, failures

log = logging.getLogger(__name__)

# Smaller blobs go through httpx in one PUT already; the thread hop buys nothing there.
DIRECT_MIN = 16 << 20
# sendfile() calls of this size: progress is reported, and an abandon noticed, between them.
_SEND_PIECE = 8 << 20
_TLS_PIECE = 1 << 20

# What a push does with a blob once its digest is known: "existing" or "mounted" when
# the registry needs no upload for it, None to upload it.
Outcome = str | None
Decide = Callable[[str], Awaitable[Outcome]]
# Reads a file of a given size once and returns its digest ("sha256:<hex>"); a caller
# may learn more of the file on the way (by a closure), here it is only the digest.
HashFile = Callable[[str, int], str]


@dataclass
class UploadStats:
    direct: int = 0
    hashed_while_sent: int = 0
    abandoned: int = 0
    fallbacks: int = 0


class DirectUploads:
    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.stats = UploadStats()
        self.transport = DirectTransport(client)

    @property
    def enabled(self) -> bool:
        return self.transport.enabled

    def worth_it(self, size: int) -> bool:
        return self.enabled and size >= DIRECT_MIN

    async def upload(self, repo: str, digest: str, size: int, path: str,
                     progress: ProgressFn | None = None) -> None:
        """Store the file as blob `digest` of `repo` (its digest already known)."""
        digests.validate(digest)
        if self.worth_it(size):
            await self._upload(repo, path, size, progress, digest=digest)
            return
        self.stats.fallbacks += 1
        await self.client.upload_blob(repo, digest, size, path, progress)

    async def upload_hashing(self, repo: str, path: str, size: int, decide: Decide,
                             progress: ProgressFn | None = None, *,
                             hash_file: HashFile | None = None) -> tuple[str, Outcome]:
        """Send the file to `repo` while hashing it with `hash_file(path, size)` in a
        worker thread (`digest.of_file` unless the caller wants more out of the same
        read). `decide(digest)` runs as soon as the digest is known: "existing" or
        "mounted" stops the upload. Returns the digest and what `decide` said (None:
        the blob was uploaded)."""
        assert self.worth_it(size)
        return await self._upload(repo, path, size, progress, decide=decide,
                                  hash_file=hash_file)

    async def _upload(self, repo: str, path: str, size: int, progress: ProgressFn | None, *,
                      digest: str | None = None, decide: Decide | None = None,
                      hash_file: HashFile | None = None) -> tuple[str, Outcome]:
        session = _Session(await self.client.start_upload(repo))
        try:
            return await self._send_session(repo, path, size, progress, session, digest, decide,
                                            hash_file)
        except BaseException:
            if session.open:
                await self._drop(session)
            raise

    async def _send_session(self, repo: str, path: str, size: int,
                            progress: ProgressFn | None, session: _Session,
                            digest: str | None, decide: Decide | None,
                            hash_file: HashFile | None) -> tuple[str, Outcome]:
        """One streamed PATCH of the file into the session, hashed meanwhile unless the
        digest is known; then `PUT ?digest=`, or the session dropped if `decide` says
        the registry needs no upload, or the blob sent again through httpx."""
        bar = _Bar(progress)
        stop = threading.Event()
        hashed = digest is None
        outcome: Outcome = None
        failed: Fallback | None = None

        async def hash_then_decide() -> None:
            nonlocal digest, outcome
            digest = digests.validate(
                await trio.to_thread.run_sync(hash_file or digests.of_file, path, size,
                                              abandon_on_cancel=True))
            if decide is not None:
                outcome = await decide(digest)
            if outcome is not None:
                stop.set()

        async def send() -> None:
            nonlocal failed
            try:
                target = self.transport.target(session.location)
                # A streamed PATCH, its body chunked (see _send): no length, no range.
                headers = self.transport.headers(
                    "PATCH", target, {"Content-Type": "application/octet-stream"})
                await self._in_thread(target, headers, path, size, bar, stop, session)
            except Fallback as exc:
                failed = exc

        try:
            async with trio.open_nursery() as nursery:
                if hashed:
                    nursery.start_soon(hash_then_decide)
                nursery.start_soon(send)
        except BaseExceptionGroup as group:
            # Callers handle single galleryfs errors (and map them to messages).
            raise first_error(group) from None
        assert digest is not None
        if outcome is not None:
            # The body was ended early (or had all gone): the session holds what was
            # sent, and is dropped by its current URL.
            self.stats.abandoned += 1
            bar.finish(size)  # nothing more to send for this file
            await self._close(session)
            return digest, outcome
        if failed is None:
            try:
                stored = await self.client.finish_upload(session.location, digest,
                                                         f"upload {digest} to {repo}")
            except RegistryError as exc:
                log.debug("closing the direct upload of %s failed: %s; via httpx", digest, exc)
            else:
                session.open = False
                if stored and stored != digest:
                    raise DigestMismatch(
                        f"upload of {digest} to {repo}: the registry computed {stored}")
                self.stats.direct += 1
                self.stats.hashed_while_sent += hashed
                return digest, None
        else:
            log.debug("direct upload of %s to %s: %s; via httpx", digest, repo, failed)
        await self._close(session)
        bar.undo()
        self.stats.fallbacks += 1
        await self.client.upload_blob(repo, digest, size, path, progress)
        return digest, None

    # ---- helpers -----------------------------------------------------------------

    async def _in_thread(self, target: str, headers: dict[str, str], path: str, size: int,
                         bar: _Bar, stop: threading.Event, session: _Session) -> None:
        token = trio.lowlevel.current_trio_token()

        def progress(n: int) -> None:  # in the worker thread
            try:
                trio.from_thread.run_sync(bar, n, trio_token=token)
            except trio.RunFinishedError:  # abandoned by a cancel: nobody is counting
                pass

        try:
            # Abandoned on cancel: the thread stops at its next piece (stop is set).
            await trio.to_thread.run_sync(
                self._send, target, headers, path, size, progress, stop, session,
                abandon_on_cancel=True)
        finally:
            stop.set()
            self.client.requests_sent += 1

    async def _drop(self, session: _Session) -> None:
        """Drop the session of an upload that failed or was cancelled (Ctrl-C) half way,
        rather than leave the registry holding what was sent until it expires it: once
        the sender has stopped (at its next piece) and learnt the session's current URL,
        the only one the registry takes once bytes arrived. Each step is bounded; a
        sender slower than that leaves the DELETE to the first URL, which may be refused."""
        with trio.CancelScope(shield=True):
            if session.started.is_set():
                await trio.to_thread.run_sync(session.sent.wait, DROP_TIMEOUT)
            with trio.move_on_after(DROP_TIMEOUT):
                await self._close(session)

    async def _close(self, session: _Session) -> None:
        """Drop a session we will not finish, by its current URL."""
        session.open = False
        await self.client.cancel_upload(session.location)

    # ---- in a worker thread ------------------------------------------------------

    def _send(self, target: str, headers: dict[str, str], path: str, size: int,
              progress: ProgressFn, stop: threading.Event, session: _Session) -> None:
        """A PATCH whose body is the file; the session moves on to the URL it answers.

        The body is sent chunked, so that a `stop` ends it early but cleanly between two
        pieces: the registry then answers with the session's current URL, the only one
        it takes from then on (to drop it). A file that shrinks within a piece breaks
        the body instead (its chunk header promised the bytes): that session is left to
        the registry's purge.
        """
        session.started.set()
        # Not a pooled connection: one that idled out would cost the whole file again
        # through httpx.
        conn = self.transport.connect()
        try:
            with failures(), open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    raise RegistryError(f"{path} changed size since it was listed")
                conn.putrequest("PATCH", target, skip_accept_encoding=True)
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                sock = conn.sock
                assert sock is not None
                # Over TLS the bytes pass through Python anyway, through one buffer:
                # smaller pieces notice a stop sooner, at no cost.
                tls = isinstance(sock, ssl.SSLSocket)
                buf = memoryview(bytearray(_TLS_PIECE)) if tls else None
                piece = _TLS_PIECE if tls else _SEND_PIECE
                offset = 0
                while offset < size and not stop.is_set():
                    n = min(piece, size - offset)
                    sock.sendall(b"%x\r\n" % n)
                    if _send_piece(sock, f, offset, n, buf) != n:
                        raise RegistryError(f"{path} shrank while it was being uploaded")
                    sock.sendall(b"\r\n")
                    offset += n
                    progress(n)
                sock.sendall(b"0\r\n\r\n")
                response = conn.getresponse()
                response.read()
            expect(response, 202)
            location = response.getheader("Location")
            if not location:
                raise Fallback("a 202 without the session's next URL")
            session.location = urljoin(session.location, location)
        finally:
            conn.close()
            session.sent.set()


@dataclass
class _Session:
    """An upload session: its current URL (the registry moves it on with every request
    that adds bytes), whether it still needs closing, and how far its sender got."""

    location: str
    open: bool = True
    started: threading.Event = field(default_factory=threading.Event)
    sent: threading.Event = field(default_factory=threading.Event)


class _Bar:
    """Progress that can be taken back when an upload starts over."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress = progress
        self.sent = 0

    def __call__(self, n: int) -> None:
        self.sent += n
        if self.progress:
            self.progress(n)

    def undo(self) -> None:
        if self.progress and self.sent:
            self.progress(-self.sent)
        self.sent = 0

    def finish(self, size: int) -> None:
        self(size - self.sent)


def _send_piece(sock: socket.socket, f: BinaryIO, offset: int, n: int,
                buf: memoryview | None) -> int:
    """Send n bytes of the file from offset; fewer only at its end. With `buf` (TLS,
    at least n bytes), through it.

    Over TLS the kernel cannot send the file itself, and `SSLSocket.sendfile` falls back
    to 8 KiB reads and sends: 1 MiB pieces cost clearly less CPU for the same wall time
    (measured against the test TLS registry, hashing meanwhile).
    """
    if buf is None:
        return sock.sendfile(f, offset, n)
    sent = 0
    while sent < n:
        got = os.preadv(f.fileno(), [buf[:n - sent]], offset + sent)
        if not got:
            break
        sock.sendall(buf[:got])
        sent += got
    return sent
