"""An async client for the OCI distribution API, on httpx and trio.

It speaks only the registry protocol: manifests, blobs (whole, streamed or by range),
uploads, tags and the catalog. What a manifest means for a model is `modelpack`'s job.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from .. import digest as digests
from .. import names
from ..errors import (
    AuthError,
    DigestMismatch,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    TooLarge,
    Unsigned,
)
from . import deadline, listings
from .auth import RegistryAuth
from .credentials import Credentials
from .mirrors import Mirrors
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
# Bytes of an answer read whole (a tag list or catalog page, an error body): far more
# than a page of 1,000 names, or of every tag of a registry that ignores `n`.
ANSWER_LIMIT = 16 << 20
# Seconds a failed or cancelled upload spends dropping its session before giving up.
DROP_TIMEOUT = 5.0
_PIECE = 1 << 20
# Harbor's API refuses a page_size over 100 (422: its swagger's maximum).
HARBOR_PAGE_SIZE = 100
# Pages of one listing followed at most (Harbor's 100,000 projects, or repositories of a
# project; a catalog of 1000 pages): a server that links on forever ends there, with an
# error, instead of a listing that never ends.
MAX_PAGES = 1000
# Harbor's rule for project names: no slash, no dot segment, nothing to escape in a path.
_HARBOR_PROJECT = re.compile(r"[a-z0-9][a-z0-9._-]{0,254}")

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
    # Pull-through caches or regional mirrors, asked first for manifests by digest and
    # blobs (mirrors.py); an HTTP proxy for all registry traffic.
    mirrors: tuple[str, ...] = ()
    proxy: str | None = None


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

    def __init__(self, host: str, options: ClientOptions | None = None, *,
                 anonymous: bool = False) -> None:
        """`anonymous`: a mirror's client, which answers no challenge (a 401 is an error)."""
        self.host = host
        self.options = options or ClientOptions()
        scheme = "http" if self.options.plain_http else "https"
        self.base = f"{scheme}://{host}"
        self.retry = self.options.retry or RetryPolicy(deadline=self.options.timeout)
        self.auth = RegistryAuth(self.options.credentials, self.base)
        self.bytes_received = 0
        self.requests_sent = 0
        self._harbor: bool | None = None  # learned on first use
        self._harbor_basic = False  # Harbor's API took our Basic credentials: no more probe
        self._warned_names: set[str] = set()  # names off the grammar, warned about once
        _tune_http_reads()
        self.mirrors = Mirrors(self) if self.options.mirrors else None
        self._http = httpx.AsyncClient(
            base_url=self.base,
            auth=None if anonymous else self.auth,
            proxy=self.options.proxy,
            verify=self.tls_verify(),
            follow_redirects=True,
            # The stall deadline (deadline.py) ends a wait first; httpx's, per receive,
            # only backs it up where no operation watches.
            timeout=httpx.Timeout(2 * self.options.timeout,
                                  connect=min(10.0, self.options.timeout)),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            headers={"User-Agent": "galleryfs"},
            # The auth hook drops credentials from any request off the registry's origin.
            event_hooks={"request": [self._count_request, self.auth.request_hook,
                                     _watch_request],
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
        if self.mirrors is not None:
            await self.mirrors.aclose()
        await self._http.aclose()

    # ---- plumbing -------------------------------------------------------------------

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status in RETRY_STATUS:
            raise RetryableStatus(response)
        detail = _error_detail(response)
        if status in (401, 403) and not self.auth.ours(response.url) and \
                not self.auth.is_realm(response.url):
            # Blob storage the registry redirected to: it gets no credentials of ours.
            # (A token service's refusal is the registry's: reported below.) Not an
            # AuthError: the user's credentials are not in question, the registry's
            # storage is (the mount answers EIO, not EACCES).
            raise RegistryError(
                f"{what}: the registry redirected to {response.url.scheme}://"
                f"{response.url.netloc.decode('ascii', 'replace')}, which refused access "
                f"(HTTP {status}); galleryfs sends credentials only to the registry and the "
                "token service it names", status)
        if status == 401:
            # The account named as given (`robot$project+name` included): which of
            # several stored credentials was used is the first thing to check.
            creds = self.options.credentials
            hint = f"wrong username or password (as {creds.username})" if creds else (
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

    async def _bounded_get(self, url: str, what: str, auth: httpx.Auth | None) -> httpx.Response:
        """A GET whose answer is read whole, at most ANSWER_LIMIT (Harbor's API pages)."""
        request = self._http.build_request("GET", url)
        response = await self._http.send(request, auth=auth or httpx.USE_CLIENT_DEFAULT,
                                         stream=True)
        try:
            await _read_bounded(response, what)
        finally:
            await response.aclose()
        return response

    async def _request(self, method: str, url: str, what: str, **kwargs: object) -> httpx.Response:
        async def once() -> httpx.Response:
            request = self._http.build_request(method, url, **kwargs)  # type: ignore[arg-type]
            response = await self._http.send(request, stream=True)
            try:
                await _read_bounded(response, what)
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
        except httpx.TooManyRedirects:
            # Not a TransportError: without this, a redirect loop was a traceback.
            raise RegistryError(f"{what}: the registry redirected in a loop "
                                f"(more than {self._http.max_redirects} redirects)") from None

    # ---- API --------------------------------------------------------------------------

    async def ping(self) -> str | None:
        """Check that the registry answers its API; its Date header (a clock to compare)."""
        response = await self._request("GET", "/v2/", f"registry {self.host}")
        await response.aclose()
        return response.headers.get("date")

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        what = f"{self.host}/{repo}{'@' if digests.is_digest(reference) else ':'}{reference}"
        if self.mirrors and digests.is_digest(reference):  # never a tag: see mirrors.py
            got = await self.mirrors.first(what, lambda m: m.get_manifest(repo, reference))
            if got is not None:
                return got

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
        what = f"{self.host}/{repo}"
        async for page in self._paginate(f"/v2/{repo}/tags/list?n={page_size}", what):
            tags.extend(listings.page_names(page, "tags", names.valid_tag, what,
                                            self._warned_names))
        return tags

    async def catalog(self, page_size: int = 1000) -> list[str]:
        repos: list[str] = []
        what = f"catalog of {self.host}"
        async for page in self._paginate(f"/v2/_catalog?n={page_size}", what):
            repos.extend(listings.page_names(page, "repositories", names.valid_repository,
                                             what, self._warned_names))
        return repos

    async def repositories(self, gallery: str | None = None) -> list[str]:
        """Every repository the registry lets us see, or those of one gallery: Harbor's
        project API where the registry is a Harbor (its catalog is admin-only, so a robot
        account cannot read it), else `/v2/_catalog`."""
        if self._harbor is not False:
            found = await self.harbor_repositories(gallery)
            if found is not None:
                return found
        repos = await self.catalog()
        return repos if gallery is None else [r for r in repos if r.startswith(gallery + "/")]

    @property
    def is_harbor(self) -> bool:
        """Whether the registry's Harbor API has answered (learned on the first listing)."""
        return bool(self._harbor)

    async def harbor_repositories(self, gallery: str | None = None) -> list[str] | None:
        """Repositories from Harbor's REST API (`/api/v2.0`), all or one project's, or
        None if that API is not there.

        The first page of projects is asked as any request is (credentials only where
        the registry challenged for them): a 401 there means "not a Harbor we may use",
        and the catalog is asked instead. Once the API answered like Harbor's, it gets
        Basic credentials (Harbor's API takes them without a challenge): anonymously it
        shows only public projects. A project whose repositories we may not list (a
        robot allowed to pull but not to list) is left out with a warning, not the
        whole listing: Harbor shows a robot every project it has any permission in."""
        try:
            if not self._harbor_basic:
                await self._harbor_page(self._harbor_url("/api/v2.0/projects", 1), None)
            # Known to be Harbor: Basic, or anonymously (no credentials) if we have none.
            basic = await self.auth.basic_for_harbor()
            if basic is not None and not self._harbor_basic:
                await self._harbor_check_credentials(basic)
            if gallery is not None:
                # Only the project asked for: a Harbor with many projects is not paged
                # through to show one. Names Harbor would refuse are in no project.
                project = gallery.split("/", 1)[0]
                projects = [project] if _HARBOR_PROJECT.fullmatch(project) else []
            else:
                projects = []
                async for items in self._harbor_pages("/api/v2.0/projects", basic):
                    for p in items:
                        name = p.get("name")
                        if isinstance(name, str) and _HARBOR_PROJECT.fullmatch(name):
                            projects.append(name)
                        else:
                            log.warning("%s: ignoring a Harbor project named %r", self.host, name)
            repos: list[str] = []
            for project in dict.fromkeys(projects):
                repos += await self._harbor_project_repositories(project, basic)
            self._harbor_basic = basic is not None
        except (_NotHarbor, _HarborRefused):
            self._harbor = False
            return None
        self._harbor = True
        if gallery is not None:
            repos = [r for r in repos if r.startswith(gallery + "/")]
        return sorted(set(repos))

    async def _harbor_project_repositories(self, project: str, auth: httpx.Auth | None) -> list[str]:
        """One project's repositories (full names, `project/a/b`); none, with a warning,
        if Harbor will not list them to us (401/403: also what a project that does not
        exist answers)."""
        repos: list[str] = []
        try:
            # Project names are checked (_HARBOR_PROJECT): nothing to encode. Repository
            # names, which may hold slashes, never go into an API path here (Harbor wants
            # them encoded twice there, `a%252Fb`).
            async for items in self._harbor_pages(f"/api/v2.0/projects/{project}/repositories", auth):
                for r in items:
                    name = r.get("name")
                    if (isinstance(name, str) and name.startswith(project + "/")
                            and names.valid_repository(name)):
                        repos.append(name)
                    else:
                        log.warning("%s: ignoring repository %r listed in Harbor project %s",
                                    self.host, name, project)
        except _HarborRefused as exc:
            log.warning("%s: Harbor does not let us list the repositories of project %s "
                        "(HTTP %d): it is left out", self.host, project, exc.status)
            return []
        return repos

    async def _harbor_check_credentials(self, basic: httpx.Auth) -> None:
        """Harbor's API serves credentials it does not take as an anonymous caller (the
        public projects, no error): a robot with a mistyped secret would see only those.
        So, once, who are we: 401 is a refusal (AuthError, naming the account); a robot
        gets 412 ("not a user"), a user 200."""
        url = f"{self.base}/api/v2.0/users/current"
        what = f"Harbor API of {self.host} (/api/v2.0/users/current)"

        async def once() -> httpx.Response:
            return await self._bounded_get(url, what, basic)

        response = await self._retrying(what, once)
        if response.status_code == 401:
            self._check(response, what)

    def _harbor_url(self, path: str, page: int) -> str:
        return f"{self.base}{path}?page={page}&page_size={HARBOR_PAGE_SIZE}"

    async def _harbor_page(self, url: str, auth: httpx.Auth | None) -> tuple[list[dict], httpx.Response]:
        """One page of a listing of Harbor's API: its items and the response (for its
        headers). Raises _HarborRefused on 401/403, _NotHarbor when the answer is not
        Harbor's."""
        what = f"Harbor API of {self.host} ({urlsplit(url).path})"

        async def once() -> httpx.Response:
            return await self._bounded_get(url, what, auth)

        response = await self._retrying(what, once)
        if response.status_code in (401, 403):
            raise _HarborRefused(response.status_code)
        if response.status_code in (404, 405) or "json" not in response.headers.get("content-type", ""):
            raise _NotHarbor
        self._check(response, what)
        items = listings.harbor_items(response.content)  # bounded, depth-safe JSON
        if items is None:
            raise _NotHarbor
        return [item for item in items if isinstance(item, dict)], response

    async def _harbor_pages(self, path: str, auth: httpx.Auth | None) -> AsyncIterator[list[dict]]:
        """A listing of Harbor's API, page by page (`page`, `page_size`): the next page is
        the `Link` marked `rel="next"` (Harbor joins its links with " , ", prev first),
        on the registry's origin only; it ends when `X-Total-Count` items came, a page
        is empty, or no next page is named; after MAX_PAGES pages it is an error (a
        server that pages on forever)."""
        url = self._harbor_url(path, 1)
        seen: set[str] = set()
        count = 0
        for page in range(1, MAX_PAGES + 1):
            seen.add(url)
            items, response = await self._harbor_page(url, auth)
            yield items
            count += len(items)
            total = _total_count(response)
            if not items or (total is not None and count >= total):
                return
            next_url = _next_link(response, self.base)
            if next_url is None and (total is not None or len(items) >= HARBOR_PAGE_SIZE):
                # More to come but no link to it (a proxy that dropped the header).
                next_url = self._harbor_url(path, page + 1)
            if next_url is None:
                return
            if next_url in seen:
                log.warning("%s: Harbor's listing of %s linked back to a page it served; "
                            "stopped", self.host, path)
                return
            url = next_url
        raise RegistryError(f"Harbor API of {self.host} ({path}): more than {MAX_PAGES} "
                            "pages; stopped")

    async def _paginate(self, url: str, what: str) -> AsyncIterator[dict]:
        seen: set[str] = set()
        next_url: str | None = url
        while next_url:
            if next_url in seen:  # a registry that links back to a page it served
                break
            if len(seen) == MAX_PAGES:  # one that links on to ever new pages
                raise RegistryError(f"{what}: more than {MAX_PAGES} pages; stopped")
            seen.add(next_url)
            response = await self._request("GET", next_url, what)
            yield listings.page(response.content, what)
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
        if self.mirrors:
            got = await self.mirrors.first(what, lambda m: m.read_blob(repo, digest, size))
            if got is not None:
                return got

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
        if self.mirrors:
            async def mirrored(m: RegistryClient) -> bool:
                await m.download_blob(repo, digest, size, target, progress)
                return True

            if await self.mirrors.first(what, mirrored):
                return

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
        if self.mirrors:
            got = await self.mirrors.first(what, lambda m: m.read_range(repo, digest, start, end))
            if got is not None:
                return got

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


async def _read_bounded(response: httpx.Response, what: str) -> None:
    """Read the body of an answer read whole (a listing page, an error) into
    `response.content`, refusing one over ANSWER_LIMIT: a body that never ends keeps
    moving, so the stall deadline alone would read it for ever, into memory."""
    length = response.headers.get("content-length", "")
    # A HEAD's Content-Length is the size of what a GET would send (a blob's): no body.
    if response.request.method != "HEAD" and length.isdigit() and int(length) > ANSWER_LIMIT:
        raise TooLarge(f"{what}: answer of {length} bytes exceeds the "
                       f"{ANSWER_LIMIT >> 20} MiB limit")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > ANSWER_LIMIT:
            raise TooLarge(f"{what}: answer exceeds the {ANSWER_LIMIT >> 20} MiB limit")
    response._content = bytes(body)  # what httpx's own `aread` sets


class _NotHarbor(Exception):
    pass


class _HarborRefused(Exception):
    """Harbor's API answered 401 or 403: it will not show us this listing."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


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


# One link of a Link header: <target> and its parameters (RFC 8288). Harbor joins
# links with " , "; a target may itself hold commas.
_LINK = re.compile(r'<([^>]*)>((?:\s*;\s*[^;,<]*)*)')
_REL = re.compile(r'(?i);\s*rel\s*=\s*"?([^";,]*)"?')


def _next_link(response: httpx.Response, base: str) -> str | None:
    """The absolute URL of the Link marked `rel="next"` (not merely the first link:
    Harbor names the previous page first), if it is on the registry's origin."""
    header = ", ".join(response.headers.get_list("link"))
    for target, params in _LINK.findall(header):
        rel = _REL.search(params)
        if rel and "next" in rel.group(1).lower().split():
            url = urljoin(str(response.request.url), target.strip())
            # Following a Link to another origin would hand it our credentials.
            if urlsplit(url)[:2] != urlsplit(base)[:2]:
                log.warning("ignoring pagination link to another origin: %s", url)
                return None
            return url
    return None


def _total_count(response: httpx.Response) -> int | None:
    """Harbor's `X-Total-Count`: how many items the whole listing has, if said."""
    value = response.headers.get("x-total-count", "").strip()
    return int(value) if value.isdigit() else None


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
