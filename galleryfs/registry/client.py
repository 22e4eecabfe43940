"""An async client for the OCI distribution API, on httpx and trio.

It speaks only the registry protocol: manifests, blobs (whole, streamed or by range),
uploads, tags and the catalog. What a manifest means for a model is `modelpack`'s job.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from .. import digest as digests
from ..errors import (
    AuthError,
    DigestMismatch,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    TooLarge,
    Unsigned,
)
from . import deadline
from .auth import RegistryAuth
from .credentials import Credentials
from .rangecheck import range_mismatch
from .retry import RETRY_STATUS, RetryableStatus, RetryPolicy, with_retries

log = logging.getLogger(__name__)

MANIFEST_LIMIT = 4 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
UPLOAD_CHUNK = 64 << 20
MONOLITHIC_LIMIT = 16 << 20
# Seconds a failed or cancelled upload spends dropping its session before giving up.
DROP_TIMEOUT = 5.0
_PIECE = 1 << 20

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class ClientOptions:
    plain_http: bool = False
    ca_file: str | None = None
    credentials: Credentials | None = None
    timeout: float = 30.0
    retry: RetryPolicy | None = None


# httpcore reads a response 64 KiB per socket receive, and every piece then goes through
# h11's event machinery in Python: that, not the network, caps a blob streamed through
# httpx (a pull, a copy, the range reads the direct path hands back), in throughput and
# in CPU. A receive returns what the socket holds, so small responses are unaffected.
# The knob is a class attribute of httpcore's HTTP/1.1 connection, so it is set once per
# process, and only if it still exists (tests/test_library_internals.py says when an
# httpcore upgrade takes it away).
HTTP_READ_BYTES = 1 << 20


def _tune_http_reads() -> None:
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # pragma: no cover - a future httpcore
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", HTTP_READ_BYTES) < HTTP_READ_BYTES:
        AsyncHTTP11Connection.READ_NUM_BYTES = HTTP_READ_BYTES


class RegistryClient:
    """One registry host. Use as `async with RegistryClient(host, options) as c:`."""

    def __init__(self, host: str, options: ClientOptions | None = None) -> None:
        self.host = host
        self.options = options or ClientOptions()
        scheme = "http" if self.options.plain_http else "https"
        self.base = f"{scheme}://{host}"
        self.retry = self.options.retry or RetryPolicy(deadline=self.options.timeout)
        self.auth = RegistryAuth(self.options.credentials)
        self.bytes_received = 0
        self.requests_sent = 0
        self._harbor: bool | None = None  # learned on first use
        _tune_http_reads()
        self._http = httpx.AsyncClient(
            base_url=self.base,
            auth=self.auth,
            verify=self.tls_verify(),
            follow_redirects=True,
            # The stall deadline (deadline.py) ends a wait first; httpx's, per receive,
            # only backs it up where no operation watches.
            timeout=httpx.Timeout(2 * self.options.timeout,
                                  connect=min(10.0, self.options.timeout)),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            headers={"User-Agent": "galleryfs"},
            event_hooks={"request": [self._count_request, _watch_request],
                         "response": [_watch_response]},
        )

    def tls_verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify`: the TLS context for the registry, False for plain HTTP."""
        if self.options.plain_http:
            return False
        ctx = ssl.create_default_context()
        if self.options.ca_file:
            try:
                ctx.load_verify_locations(self.options.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RegistryUnavailable(f"cannot load CA file {self.options.ca_file}: {exc}") from None
        return ctx

    async def _count_request(self, request: httpx.Request) -> None:
        self.requests_sent += 1

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- plumbing -------------------------------------------------------------------

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status in RETRY_STATUS:
            raise RetryableStatus(response)
        detail = _error_detail(response)
        if status == 401:
            hint = "wrong username or password" if self.options.credentials else (
                "authentication required: use `galleryfs login` or --username/--password-stdin")
            raise AuthError(f"{self.host}: {hint} ({what})", status)
        if status == 403:
            raise AuthError(f"{self.host}: access denied to {what}{detail}", status)
        if status == 404:
            raise NotFound(f"{what}: not found on {self.host}{detail}", status)
        if status == 412:
            # Harbor, when the project lets only signed artifacts be pulled.
            raise Unsigned(f"{what}: the registry refuses unsigned artifacts in this project "
                           "(HTTP 412): sign the revision with `galleryfs sign`, or ask the "
                           f"project's admin{detail}")
        raise RegistryError(f"{what}: registry answered HTTP {status}{detail}", status)

    async def _request(self, method: str, url: str, what: str, **kwargs: object) -> httpx.Response:
        async def once() -> httpx.Response:
            response = await self._http.request(method, url, **kwargs)  # type: ignore[arg-type]
            try:
                self._check(response, what)
            except Exception:
                await response.aclose()
                raise
            return response

        return await self._retrying(what, once)

    async def _retrying(self, what: str, call):  # type: ignore[no-untyped-def]
        """`call` with retries, under the stall deadline of the operation it serves (or
        of its own): `--timeout` without 64 KiB moving fails it, retries included."""
        try:
            with deadline.deadline(self.options.timeout, what):
                return await with_retries(self.retry, what, call)
        except RetryableStatus as exc:
            raise RegistryError(
                f"{what}: registry answered HTTP {exc.response.status_code} (after retries)",
                exc.response.status_code,
            ) from None
        except httpx.TransportError as exc:
            raise _unavailable(self.host, exc) from None

    # ---- API --------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._request("GET", "/v2/", f"registry {self.host}")

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        what = f"{self.host}/{repo}{'@' if digests.is_digest(reference) else ':'}{reference}"

        async def once() -> Manifest:
            async with self._http.stream(
                "GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}
            ) as response:
                self._check(response, what)
                length = int(response.headers.get("content-length") or 0)
                if length > MANIFEST_LIMIT:
                    raise TooLarge(f"{what}: manifest of {length} bytes exceeds the 4 MiB limit")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MANIFEST_LIMIT:
                        raise TooLarge(f"{what}: manifest exceeds the 4 MiB limit")
                media_type = response.headers.get("content-type", "").split(";")[0].strip()
                header_digest = response.headers.get("docker-content-digest")
            return _verified_manifest(bytes(body), media_type, reference, header_digest, what)

        return await self._retrying(what, once)

    async def head_manifest(self, repo: str, reference: str) -> str | None:
        what = f"{self.host}/{repo}:{reference}"
        try:
            response = await self._request(
                "HEAD", f"/v2/{repo}/manifests/{reference}", what,
                headers={"Accept": MANIFEST_ACCEPT},
            )
        except NotFound:
            return None
        return response.headers.get("docker-content-digest")

    async def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        what = f"{self.host}/{repo}:{reference}"
        response = await self._request(
            "PUT", f"/v2/{repo}/manifests/{reference}", what,
            content=body, headers={"Content-Type": media_type},
        )
        expected = digests.of_bytes(body)
        got = response.headers.get("docker-content-digest", expected)
        if got != expected:
            raise DigestMismatch(f"{what}: registry stored manifest as {got}, expected {expected}")
        return expected

    async def delete_manifest(self, repo: str, digest: str) -> None:
        digests.validate(digest)
        await self._request("DELETE", f"/v2/{repo}/manifests/{digest}", f"{self.host}/{repo}@{digest}")

    async def list_tags(self, repo: str, page_size: int = 1000) -> list[str]:
        tags: list[str] = []
        async for page in self._paginate(f"/v2/{repo}/tags/list?n={page_size}", f"{self.host}/{repo}"):
            tags.extend(page.get("tags") or [])
        return tags

    async def catalog(self, page_size: int = 1000) -> list[str]:
        repos: list[str] = []
        async for page in self._paginate(f"/v2/_catalog?n={page_size}", f"catalog of {self.host}"):
            repos.extend(page.get("repositories") or [])
        return repos

    async def repositories(self) -> list[str]:
        """Every repository the registry lets us see: Harbor's project API where the
        registry is a Harbor (robot accounts often may not read the catalog), else
        `/v2/_catalog`."""
        if self._harbor is not False:
            found = await self.harbor_repositories()
            if found is not None:
                return found
        return await self.catalog()

    async def harbor_repositories(self, page_size: int = 100) -> list[str] | None:
        """Repositories from Harbor's REST API (`/api/v2.0`), or None if it is not there."""
        what = f"Harbor projects of {self.host}"
        auth = None
        if self.options.credentials:
            auth = httpx.BasicAuth(self.options.credentials.username, self.options.credentials.password)

        async def pages(path: str) -> AsyncIterator[list]:
            page = 1
            while True:
                async def once(page: int = page) -> httpx.Response:
                    return await self._http.get(path, params={"page": page, "page_size": page_size},
                                                auth=auth or httpx.USE_CLIENT_DEFAULT)

                response = await self._retrying(what, once)
                if response.status_code in (404, 405) or "json" not in response.headers.get(
                        "content-type", ""):
                    raise _NotHarbor
                self._check(response, what)
                try:
                    items = response.json()
                except ValueError:
                    raise _NotHarbor from None
                if not isinstance(items, list):
                    raise _NotHarbor
                yield items
                if len(items) < page_size:
                    return
                page += 1

        try:
            projects: list[str] = []
            async for items in pages("/api/v2.0/projects"):
                projects += [p["name"] for p in items
                             if isinstance(p, dict) and isinstance(p.get("name"), str)]
            repos: list[str] = []
            for project in projects:
                async for items in pages(f"/api/v2.0/projects/{project}/repositories"):
                    repos += [r["name"] for r in items
                              if isinstance(r, dict) and isinstance(r.get("name"), str)]
        except _NotHarbor:
            self._harbor = False
            return None
        self._harbor = True
        return sorted(repos)

    async def _paginate(self, url: str, what: str) -> AsyncIterator[dict]:
        seen: set[str] = set()
        next_url: str | None = url
        while next_url:
            if next_url in seen:  # a registry that links back to a page it served
                break
            seen.add(next_url)
            response = await self._request("GET", next_url, what)
            try:
                page = response.json()
            except ValueError:
                raise RegistryError(f"{what}: registry sent a listing that is not JSON") from None
            yield page if isinstance(page, dict) else {}
            next_url = _next_link(response, self.base)

    async def blob_size(self, repo: str, digest: str) -> int | None:
        """The blob's size if the repository has it, else None (a HEAD, nothing sent)."""
        digests.validate(digest)
        try:
            response = await self._request(
                "HEAD", f"/v2/{repo}/blobs/{digest}", f"{self.host}/{repo}@{digest}")
        except NotFound:
            return None
        return int(response.headers.get("content-length", -1))

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount: True if the registry linked the blob without a transfer."""
        what = f"mount {digest} from {from_repo} into {repo}"
        response = await self._request(
            "POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}", what)
        if response.status_code == 201:
            return True
        # 202: the registry opened an upload instead; cancel it, we upload ourselves.
        location = response.headers.get("location")
        if location:
            try:
                await self._http.delete(urljoin(self.base + "/", location))
            except httpx.HTTPError:
                pass
        return False

    async def start_upload(self, repo: str) -> str:
        """Open an upload session; its absolute URL."""
        what = f"start an upload to {self.host}/{repo}"
        response = await self._request("POST", f"/v2/{repo}/blobs/uploads/", what)
        return _location(response, self.base, what)

    async def finish_upload(self, location: str, digest: str, what: str) -> str:
        """Close an upload session whose bytes were all sent; the digest the registry
        computed (empty when it does not say)."""
        response = await self._request("PUT", with_digest(location, digest), what)
        return response.headers.get("docker-content-digest", "")

    async def cancel_upload(self, location: str) -> None:
        """Drop an upload session. Best effort, never raises: registries also expire
        them, and a caller dropping one is already giving up on it."""
        try:
            await self._http.delete(location)
        except httpx.HTTPError as exc:
            log.debug("cancelling upload session %s failed: %s", location, exc)

    async def upload_blob(
        self, repo: str, digest: str, size: int, path: str,
        progress: ProgressFn | None = None, chunk_size: int = UPLOAD_CHUNK,
    ) -> None:
        """Upload a file as a blob: one PUT when small, PATCHes of `chunk_size` when large."""
        digests.validate(digest)
        what = f"upload {digest} to {self.host}/{repo}"

        sent = [0]

        def counted(n: int) -> None:
            sent[0] += n
            if progress:
                progress(n)

        async def once() -> None:
            if progress and sent[0]:
                progress(-sent[0])  # a retry starts over: so does the bar
            sent[0] = 0
            location = await self.start_upload(repo)
            try:
                if size <= MONOLITHIC_LIMIT:
                    data = await trio.to_thread.run_sync(_read_range, path, 0, size)
                    response = await self._request(
                        "PUT", with_digest(location, digest), what, content=data,
                        headers={"Content-Type": "application/octet-stream"})
                    counted(size)
                else:
                    offset = 0
                    while offset < size:
                        length = min(chunk_size, size - offset)
                        response = await self._http.patch(
                            location,
                            content=_file_pieces(path, offset, length, counted),
                            headers={
                                "Content-Type": "application/octet-stream",
                                "Content-Range": f"{offset}-{offset + length - 1}",
                                "Content-Length": str(length),
                            },
                        )
                        self._check(response, what)
                        location = _location(response, self.base, what)
                        offset += length
                    response = await self._request("PUT", with_digest(location, digest), what)
            except BaseException:
                # Drop the session (by its latest URL: the only one the registry takes
                # once bytes arrived) rather than leave what it holds to the registry's
                # purge of old uploads. Best effort: a request that failed half way
                # may have moved it on already.
                with trio.CancelScope(shield=True), trio.move_on_after(DROP_TIMEOUT):
                    await self.cancel_upload(location)
                raise
            got = response.headers.get("docker-content-digest", digest)
            if got != digest:
                raise DigestMismatch(f"{what}: registry computed {got}")

        # A failed chunked upload restarts from the beginning: the registry drops the
        # session on most errors, and resuming needs state we cannot trust after a 5xx.
        await self._retrying(what, once)

    async def upload_blob_bytes(self, repo: str, digest: str, data: bytes) -> None:
        digests.validate(digest)
        if digests.of_bytes(data) != digest:
            raise DigestMismatch(f"refusing to upload bytes that do not match {digest}")
        what = f"upload {digest} to {self.host}/{repo}"

        async def once() -> None:
            response = await self._request("POST", f"/v2/{repo}/blobs/uploads/", what)
            location = _location(response, self.base, what)
            await self._request("PUT", with_digest(location, digest), what, content=data,
                                headers={"Content-Type": "application/octet-stream"})

        await self._retrying(what, once)

    async def copy_blob_from(self, source: RegistryClient, source_repo: str, repo: str,
                             digest: str, size: int, progress: ProgressFn | None = None) -> None:
        """Stream a blob from another registry into this one, without a local copy."""
        what = f"copy {digest} to {self.host}/{repo}"

        async def body() -> AsyncIterator[bytes]:
            verifier = digests.Verifier(digest, size)
            async with source.open_blob(source_repo, digest) as response:
                async for chunk in response.aiter_bytes(_PIECE):
                    verifier.update(chunk)
                    if progress:
                        progress(len(chunk))
                    yield chunk
            verifier.check()

        async def once() -> None:
            response = await self._request("POST", f"/v2/{repo}/blobs/uploads/", what)
            location = _location(response, self.base, what)
            await self._request("PUT", with_digest(location, digest), what, content=body(),
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(size)})

        await self._retrying(what, once)

    async def read_blob(self, repo: str, digest: str, size: int) -> bytes:
        """A small blob (a config), whole and verified."""
        verifier = digests.Verifier(digest, size)
        what = f"{self.host}/{repo}@{digest}"

        async def once() -> bytes:
            async with self.open_blob(repo, digest) as response:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > size:
                        break
            return bytes(data)

        data = await self._retrying(what, once)
        verifier.update(data)
        verifier.check()
        self.bytes_received += len(data)
        return data

    async def download_blob(self, repo: str, digest: str, size: int, target: Path,
                            progress: ProgressFn | None = None) -> None:
        """Stream a blob into `target`, verifying size and digest; the file is removed on error."""
        what = f"{self.host}/{repo}@{digest}"

        async def once() -> None:
            verifier = digests.Verifier(digest, size)
            sent = 0
            try:
                async with self.open_blob(repo, digest) as response:
                    with open(target, "wb") as out:
                        async for chunk in response.aiter_bytes(_PIECE):
                            verifier.update(chunk)
                            await trio.to_thread.run_sync(out.write, chunk)
                            sent += len(chunk)
                            if progress:
                                progress(len(chunk))
                verifier.check()
                self.bytes_received += sent
            except BaseException:
                if progress and sent:
                    progress(-sent)
                target.unlink(missing_ok=True)
                raise

        await self._retrying(what, once)

    async def delete_tag(self, repo: str, tag: str) -> None:
        """Remove one tag. Registries without tag deletion (Distribution 2.x) refuse
        `DELETE manifests/<tag>`; there the revision is deleted only if no other tag
        names it, since deleting it would silently take the other tags along."""
        what = f"{self.host}/{repo}:{tag}"
        digest = await self.head_manifest(repo, tag)
        if digest is None:
            raise NotFound(f"{what}: not found on {self.host}", 404)
        try:
            await self._request("DELETE", f"/v2/{repo}/manifests/{tag}", what)
            return
        except RegistryError as exc:
            if exc.status not in (400, 405):
                raise
        others = []
        for other in await self.list_tags(repo):
            if other != tag and await self.head_manifest(repo, other) == digest:
                others.append(other)
        if others:
            raise RegistryError(
                f"{what}: this registry cannot remove a single tag, and the revision "
                f"{digest} is also tagged {', '.join(sorted(others))}; remove the whole "
                f"revision with {self.host}/{repo}@{digest}", 400)
        await self.delete_manifest(repo, digest)

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: str, start: int = 0,
                        end: int | None = None) -> AsyncIterator[httpx.Response]:
        """A streaming GET of a blob, or of bytes [start, end) of it."""
        digests.validate(digest)
        what = f"{self.host}/{repo}@{digest}"
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"

        async def once() -> httpx.Response:
            request = self._http.build_request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
            response = await self._http.send(request, stream=True)
            try:
                self._check(response, what)
                if headers:
                    # Not retried: a registry (or a cache in front of it) that answers
                    # with other bytes than asked will do it again.
                    reason = range_mismatch(
                        response.status_code, response.headers.get("content-range"),
                        response.headers.get("content-length"), start, end)
                    if reason:
                        raise RegistryError(f"{what}: {reason}", response.status_code)
            except Exception:
                await response.aclose()
                raise
            return response

        # The body is read after `_retrying` returned: the stall deadline covers it too.
        with deadline.deadline(self.options.timeout, what):
            response = await self._retrying(what, once)
            try:
                yield response
            finally:
                await response.aclose()

    async def read_range(self, repo: str, digest: str, start: int, end: int) -> bytearray:
        """Bytes [start, end) of a blob, exactly, retried as a whole on transient errors."""
        what = f"{self.host}/{repo}@{digest}[{start}:{end}]"

        async def once() -> bytearray:
            # Pieces go straight into one buffer of the final size: no list of pieces
            # plus a joined copy (twice the chunk in memory, one more copy).
            buf = bytearray(end - start)
            got = 0
            with memoryview(buf) as view:
                async with self.open_blob(repo, digest, start, end) as response:
                    async for piece in response.aiter_bytes():
                        n = len(piece)
                        if got + n > len(buf):
                            raise httpx.ReadError(f"long read: more than {len(buf)} bytes")
                        view[got:got + n] = piece
                        got += n
            if got != len(buf):
                raise httpx.ReadError(f"short read: {got} of {end - start} bytes")
            self.bytes_received += got
            return buf

        return await self._retrying(what, once)


# ---- helpers ---------------------------------------------------------------------------


class _NotHarbor(Exception):
    pass


class _Watched(httpx.AsyncByteStream):
    """A body that marks the current operation's watchdog (deadline.py) as its bytes
    arrive, or as they go out (`sent`: marked once the transport asks for more; pieces
    over `_WATCH_PIECE` are handed on in slices, so a large PUT is not one mark)."""

    def __init__(self, stream: httpx.AsyncByteStream, *, sent: bool = False) -> None:
        self.stream = stream
        self.sent = sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            if not self.sent:
                deadline.mark(len(chunk))
                yield chunk
                continue
            with memoryview(chunk) as view:
                for i in range(0, len(chunk), _WATCH_PIECE):
                    yield bytes(view[i:i + _WATCH_PIECE]) if len(chunk) > _WATCH_PIECE else chunk
                    deadline.mark(min(_WATCH_PIECE, len(chunk) - i))

    async def aclose(self) -> None:
        await self.stream.aclose()


_WATCH_PIECE = 1 << 20


async def _watch_request(request: httpx.Request) -> None:
    if isinstance(request.stream, httpx.AsyncByteStream) and not isinstance(
            request.stream, _Watched):
        request.stream = _Watched(request.stream, sent=True)


async def _watch_response(response: httpx.Response) -> None:
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _Watched(response.stream)


def _causes(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 6:
        parts.append(f"{type(seen).__name__} {seen}")
        seen = seen.__cause__ or seen.__context__
    return " ".join(parts)


def _unavailable(host: str, exc: Exception) -> RegistryUnavailable:
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in _causes(exc):
        return RegistryUnavailable(
            f"{host}: TLS certificate not trusted (use --ca-file, or --plain-http for HTTP registries)")
    if isinstance(exc, httpx.TimeoutException):
        return RegistryUnavailable(f"{host}: registry did not answer in time")
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "SSL" in _causes(exc):
        # An HTTPS handshake against a plain-HTTP registry fails without a message.
        reason += " (TLS handshake failed: if the registry speaks plain HTTP, use --plain-http)"
    return RegistryUnavailable(f"cannot reach registry {host}: {reason}")


def _error_detail(response: httpx.Response) -> str:
    try:
        if not response.is_stream_consumed:
            return ""
        errors = response.json().get("errors") or []
        messages = [e.get("message") or e.get("code") for e in errors if isinstance(e, dict)]
        return f" ({'; '.join(m for m in messages if m)})" if messages else ""
    except (ValueError, AttributeError, httpx.HTTPError):
        return ""


def _verified_manifest(body: bytes, media_type: str, reference: str,
                       header_digest: str | None, what: str) -> Manifest:
    computed = digests.of_bytes(body)
    if digests.is_digest(reference):
        # By the digest's own algorithm (sha256 or sha512): a manifest named by a digest
        # is what signatures and pins stand on.
        if digests.of_bytes(body, reference.split(":", 1)[0]) != reference:
            raise DigestMismatch(f"{what}: manifest content does not match its digest")
        return Manifest(reference, media_type, body)
    if header_digest and header_digest.startswith("sha256:") and header_digest != computed:
        raise DigestMismatch(f"{what}: manifest content does not match Docker-Content-Digest")
    return Manifest(computed, media_type, body)


def _next_link(response: httpx.Response, base: str) -> str | None:
    link = response.headers.get("link")
    if not link:
        return None
    target = link.split(";", 1)[0].strip().strip("<>")
    url = urljoin(response.request.url.__str__(), target)
    # Following a Link to another origin would hand it our credentials.
    if urlsplit(url)[:2] != urlsplit(base)[:2]:
        log.warning("ignoring pagination link to another origin: %s", url)
        return None
    return url


def _location(response: httpx.Response, base: str, what: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise RegistryError(f"{what}: registry sent no upload location")
    return urljoin(str(response.request.url), location)


def with_digest(location: str, digest: str) -> str:
    # The upload URL usually carries its own query (_state=...): httpx `params=` would
    # replace it, so the digest is appended by hand.
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def _read_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def _file_pieces(path: str, offset: int, length: int,
                       progress: ProgressFn | None) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining:
            piece = await trio.to_thread.run_sync(f.read, min(_PIECE * 8, remaining))
            if not piece:
                raise RegistryError(f"{path} shrank while it was being uploaded")
            remaining -= len(piece)
            if progress:
                progress(len(piece))
            yield piece
