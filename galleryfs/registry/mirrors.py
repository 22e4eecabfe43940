"""Pull-through caches and regional mirrors, asked before the registry's origin.

`--mirror URL` (repeatable): manifests named by digest and blobs are asked of each
mirror in the order given, then of the origin. Tags are always resolved at the origin:
a mirror's cache of a tag may be stale, and a digest is the same content everywhere.

A mirror is trusted with nothing:

- it gets no credentials (its client answers no challenge: a 401 is a failure), since
  credentials go only to the registry's origin and the token realm it names;
- what it sends is checked as the origin's is (the manifest's digest, a blob's digest,
  the mount's chunk tables), so a lying mirror costs a fallback, not wrong bytes.

A mirror that fails (refused, timed out, an error status, wrong bytes) is skipped for
`SKIP_SECONDS`, with one warning: a dead mirror costs one failure per window, not one
timeout per request. Nothing is retried at a mirror: the next source is the retry.

One answer is a miss, not a failure: the whole blob (200) for a range. A pull-through
cache (distribution's proxy mode) answers so while it has not cached the blob yet, and
caches it meanwhile; that range comes from the next source and the mirror is asked again
for the next one, so a fleet starting together against a cold mirror fills it and then
reads from it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import httpx

from ..errors import GalleryError, RegistryError, UsageError
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .client import ClientOptions, RegistryClient

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a failed mirror is left out before it is asked again.
SKIP_SECONDS = 30.0
# What a mirror's failure may look like; anything else (a bug, a cancel) propagates.
FAILURES = (GalleryError, httpx.HTTPError, OSError)


def check_url(url: str, option: str) -> str:
    """The URL of a mirror or proxy, refused in one line unless it is scheme://host[:port]."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"{option} {url}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{option} {url}: expected http://HOST[:PORT] or https://HOST[:PORT]")
    if not parts.hostname:
        raise UsageError(f"{option} {url}: no host")
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{option} {url}: no credentials in the URL "
                         "(a mirror gets none; a proxy's would show in the process list)")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise UsageError(f"{option} {url}: no path or query (a mirror serves /v2/ at its root)")
    return f"{parts.scheme}://{parts.netloc}"


class Mirror:
    """One mirror: an anonymous client and when it may be asked again."""

    def __init__(self, url: str, client: RegistryClient) -> None:
        self.url = url
        self.client = client
        self.skip_until = 0.0

    def __repr__(self) -> str:
        return f"<Mirror {self.url}>"


class Mirrors:
    """The mirrors of one registry client, in the order given, and the fallback policy."""

    def __init__(self, origin: RegistryClient) -> None:
        options = origin.options
        self.mirrors = [Mirror(url, type(origin)(urlsplit(url).netloc, _mirror_options(url, options),
                                                 anonymous=True))
                        for url in options.mirrors]

    def available(self) -> list[Mirror]:
        now = time.monotonic()
        return [m for m in self.mirrors if m.skip_until <= now]

    def failed(self, mirror: Mirror, what: str, reason: object) -> None:
        """Leave the mirror out for SKIP_SECONDS; one warning says why. A miss (see
        above) leaves it in."""
        if isinstance(reason, RegistryError) and reason.status == 200:
            log.debug("mirror %s: %s not cached yet (%s)", mirror.url, what, reason)
            return
        now = time.monotonic()
        if mirror.skip_until > now:
            # A request that was already under way when the mirror was left out.
            log.debug("mirror %s failed for %s (%s)", mirror.url, what, reason)
            return
        mirror.skip_until = now + SKIP_SECONDS
        log.warning("mirror %s failed for %s (%s); using the next source, and skipping this "
                    "mirror for %gs", mirror.url, what, reason, SKIP_SECONDS)

    async def first(self, what: str, call: Callable[[RegistryClient], Awaitable[T]]) -> T | None:
        """The first mirror's answer to `call` that does not fail; None when none answered
        (the caller asks the origin)."""
        for mirror in self.available():
            try:
                return await call(mirror.client)
            except FAILURES as exc:
                self.failed(mirror, what, exc)
        return None

    @property
    def bytes_received(self) -> int:
        return sum(m.client.bytes_received for m in self.mirrors)

    @property
    def requests_sent(self) -> int:
        return sum(m.client.requests_sent for m in self.mirrors)

    async def aclose(self) -> None:
        for mirror in self.mirrors:
            await mirror.client.aclose()


def _mirror_options(url: str, options: ClientOptions) -> ClientOptions:
    # No credentials, no mirrors of its own, one attempt (the next source is the retry);
    # the origin's TLS trust, timeout and proxy.
    return dataclasses.replace(
        options, plain_http=urlsplit(url).scheme == "http", credentials=None, mirrors=(),
        retry=RetryPolicy(attempts=1, deadline=options.timeout))
