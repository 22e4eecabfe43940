"""Bulk blob bytes over stdlib http.client in worker threads, beside httpx.

httpx handles HTTP in Python on the event loop: h11 copies every body byte twice more
than the socket does, and in a cold sequential read through the mount the trio thread
spent about 40% of its time there (py-spy), the same thread that answers the kernel.
The two bulk transfers therefore have a direct path:

- range reads `readinto` the chunk's own buffer (`recv_into`, GIL released);
- uploads send the file with `socket.sendfile` (zero-copy; plain sendall of 1 MiB
  pieces over TLS) as one monolithic PUT.

Only the plain case takes it: a registry answering itself, with the credentials httpx
already negotiated (the caller passes the Authorization header). Anything else (a 401 from
an expired token, a redirect such as Harbor's to S3 storage, another status, a transport
failure) raises `Fallback`, and the caller does the request again through httpx, which
does auth, redirects and retries. With a proxy in the environment (httpx honours it) the
direct path is off.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_SEND_PIECE = 8 << 20  # sendfile per call: progress granularity


class Fallback(Exception):
    """The direct path cannot do this request; httpx will."""


@dataclass
class DirectStats:
    ranges: int = 0  # range reads received directly
    uploads: int = 0  # blobs sent directly
    fallbacks: int = 0  # requests handed to httpx


@dataclass(frozen=True)
class Upload:
    status: int
    digest: str | None  # Docker-Content-Digest of the answer


class DirectHTTP:
    """A small pool of keep-alive connections to one registry origin (thread-safe)."""

    def __init__(self, base: str, tls: ssl.SSLContext | None, timeout: float) -> None:
        url = urlsplit(base)
        self.origin = f"{url.scheme}://{url.netloc}"
        self.enabled = _no_proxy_for(url.hostname or "")
        self.stats = DirectStats()
        self._host, self._port = url.hostname or "", url.port
        self._tls = tls
        self._timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def same_origin(self, url: str) -> bool:
        u = urlsplit(url)
        return f"{u.scheme}://{u.netloc}" == self.origin

    # ---- connections --------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self._tls is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _exchange(self, work: Callable[[http.client.HTTPConnection], object]) -> object:
        """Run `work` on a pooled connection; any failure closes it."""
        conn = self._connection()
        try:
            result = work(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)
        return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ---- range reads --------------------------------------------------------------

    def get_range(self, path: str, headers: dict[str, str], start: int, end: int) -> bytearray:
        """Bytes [start, end) of the resource at `path` (a 206 answer), or Fallback."""
        headers = {**headers, "Range": f"bytes={start}-{end - 1}"}

        def work(conn: http.client.HTTPConnection) -> bytearray:
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                m = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range") or "")
                if (response.status != 206 or m is None or int(m.group(1)) != start
                        or int(m.group(2)) != end - 1 or response.length != end - start):
                    raise Fallback(f"HTTP {response.status}")
                buf = bytearray(end - start)
                got = 0
                with memoryview(buf) as view:
                    while got < len(buf):
                        n = response.readinto(view[got:])
                        if not n:
                            raise Fallback(f"short body: {got} of {len(buf)} bytes")
                        got += n
                return buf
            except (OSError, http.client.HTTPException) as exc:
                raise Fallback(f"{type(exc).__name__}: {exc}") from None

        return self._exchange(work)  # type: ignore[return-value]

    # ---- uploads --------------------------------------------------------------------

    def put_file(self, path: str, headers: dict[str, str], file: str, size: int,
                 progress: Callable[[int], None] | None = None) -> Upload:
        """PUT a file's bytes as the body of one request to `path`; the answer, or
        Fallback when the request could not be made (nothing was stored then)."""

        def work(conn: http.client.HTTPConnection) -> Upload:
            try:
                conn.putrequest("PUT", path, skip_accept_encoding=True)
                for name, value in {**headers, "Content-Length": str(size),
                                    "Content-Type": "application/octet-stream"}.items():
                    conn.putheader(name, value)
                conn.endheaders()
                _send_file(conn, file, size, progress)
                response = conn.getresponse()
                response.read()
                return Upload(response.status, response.getheader("Docker-Content-Digest"))
            except (OSError, http.client.HTTPException) as exc:
                raise Fallback(f"{type(exc).__name__}: {exc}") from None

        return self._exchange(work)  # type: ignore[return-value]


def _send_file(conn: http.client.HTTPConnection, file: str, size: int,
               progress: Callable[[int], None] | None) -> None:
    sock = conn.sock
    assert sock is not None
    with open(file, "rb") as f:
        offset = 0
        while offset < size:
            count = min(_SEND_PIECE, size - offset)
            if isinstance(sock, ssl.SSLSocket):
                data = os.pread(f.fileno(), count, offset)
                sock.sendall(data)
                sent = len(data)
            else:
                sent = socket.socket.sendfile(sock, f, offset, count)
            if sent != count:
                raise OSError(f"{file} shrank while it was being uploaded")
            offset += sent
            if progress:
                progress(sent)


def _no_proxy_for(host: str) -> bool:
    """False when the environment routes this host through a proxy."""
    if not urllib.request.getproxies():
        return True
    return bool(urllib.request.proxy_bypass(host))
