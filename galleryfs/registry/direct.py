"""The registry over stdlib `http.client` connections, for the paths that move blob bytes
off the trio thread: `ranges` (range reads received straight into their buffer) and
`uploads` (files sent with sendfile).

`RegistryClient` (httpx) stays the one that negotiates: credentials, redirects, retries.
A `DirectTransport` only repeats what the client already settled: the registry's
address and TLS trust (copied from the client's options), the Authorization header the
client's auth flow would send first, over keep-alive connections of its own.

When a direct request gives up
------------------------------
It raises `Fallback`, and its caller hands the whole request to `RegistryClient`, when

- the registry is reached through a proxy, `--proxy` or the environment's (`enabled`
  is False: httpx goes through it, these connections would go around it);
- the URL is on another host than the registry (an upload location elsewhere);
- the connection fails or the answer is cut short (`OSError`, `HTTPException`);
- the status is not the one the request expects (`expect`): a 401 (no credentials
  negotiated yet, or an expired token: httpx answers the challenge), a redirect
  (storage behind the registry, such as Harbor's S3: httpx follows it and drops the
  credentials when it leaves the origin), any error status (httpx retries what is
  temporary and reports the rest);
- a range answer is not exactly the range asked (`expect_range`, the rule in
  `rangecheck` that the httpx path applies too: there a mismatch is an error), or its
  body is not delimited by a Content-Length (the connection could not be reused).

Nothing is retried here: httpx's retry policy is the only one, and a fallback says
nothing about the next request, which tries the direct path again.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from .rangecheck import range_mismatch

if TYPE_CHECKING:
    from .client import RegistryClient


class Fallback(Exception):
    """This request is not answered directly: hand it to `RegistryClient`."""


class DirectTransport:
    """Connections to one registry, with the trust and credentials of its httpx client."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        # --proxy, or the environment's proxy variables: these connections would go around it.
        self.enabled = not client.options.proxy and no_proxy_for(client.base)
        url = urlsplit(client.base)
        self.scheme = url.scheme
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.scheme == "https" else 80)
        # Per send or receive. Range reads are bounded by the stall deadline (deadline.py):
        # a thread it gives up is stopped by shutting its socket (ranges.py).
        self.timeout = client.options.timeout
        verify = client.tls_verify()
        self.tls = verify if isinstance(verify, ssl.SSLContext) else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    # ---- on the trio thread ------------------------------------------------------

    def serves(self, url: str) -> bool:
        """The absolute URL points at this registry (scheme, host and port)."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return (parts.scheme, parts.hostname, port) == (self.scheme, self.host, self.port)

    def target(self, url: str) -> str:
        """The request target (path and query) of an absolute URL on the registry."""
        parts = urlsplit(url)
        if not self.serves(url):
            raise Fallback(f"{url} is on another host than the registry")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def headers(self, method: str, target: str, extra: dict[str, str]) -> dict[str, str]:
        """The headers of a direct request: `extra`, and the Authorization header the
        client's auth flow would send first. Before the first challenge that is none: a
        401 then falls back, and httpx finds out what the registry wants."""
        headers = {"User-Agent": "galleryfs", **extra}
        if self.client.auth.scheme is not None:
            authorization = self.client.auth.authorization(
                httpx.Request(method, self.client.base + target))
            if authorization:
                headers["Authorization"] = authorization
        return headers

    # ---- in worker threads -------------------------------------------------------

    def connect(self) -> http.client.HTTPConnection:
        """A new connection, not pooled: the caller closes it."""
        if self.tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    @contextmanager
    def connection(self) -> Iterator[http.client.HTTPConnection]:
        """A keep-alive connection: back to the pool when the block ends normally (its
        answer read to the end), closed when it raises (the answer may be half read)."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self.connect()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)

    @property
    def idle(self) -> int:
        """Pooled connections waiting for a request."""
        return len(self._idle)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


@contextmanager
def failures() -> Iterator[None]:
    """Network failures inside the block become a `Fallback`."""
    try:
        yield
    except (OSError, http.client.HTTPException) as exc:
        raise Fallback(f"{type(exc).__name__}: {exc}") from None


def expect(response: http.client.HTTPResponse, status: int) -> None:
    if response.status != status:
        raise Fallback(f"HTTP {response.status}")


def expect_range(response: http.client.HTTPResponse, start: int, end: int) -> None:
    """The answer carries exactly bytes [start, end), in a body of that length."""
    expect(response, 206)
    reason = range_mismatch(response.status, response.getheader("Content-Range"),
                            response.getheader("Content-Length"), start, end)
    if reason is None and response.length is None:
        reason = "a 206 without Content-Length"
    if reason is not None:
        raise Fallback(reason)


def no_proxy_for(base: str) -> bool:
    """False when the environment routes this registry through a proxy (httpx honours
    it; stdlib connections would not)."""
    proxies = urllib.request.getproxies()
    if not proxies:
        return True
    return bool(urllib.request.proxy_bypass(urlsplit(base).hostname or ""))
