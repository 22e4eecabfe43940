"""Registry authentication as an httpx auth flow: Basic, and the Bearer-token dance.

A request goes out with whatever we already hold for its scope. On a 401 the challenge
says how to authenticate: Basic, or Bearer with realm/service/scope, in which case a
token is fetched from the realm (with Basic credentials if we have any, anonymously
otherwise), cached per scope, and the request is retried once.

Where credentials may go (README, "Credential rules"):

- only to the registry's own origin (scheme, host and port), and to the token realm the
  registry itself named in a challenge; an `http://` realm of an `https://` registry is
  refused when there are credentials (they would cross the network in clear);
- only in answer to the registry's own challenge: nothing is sent before the registry
  asked (then it is sent at once to the same origin, as it will ask again), and a 401
  from anywhere else, a redirect target such as blob storage, is answered with nothing;
- `request_hook` drops any Authorization header from a request to another origin, so a
  mistake elsewhere (a redirect, an upload location on another host) cannot leak one.

With a password file (`--password-file`), the password is read again whenever a new
credential is needed: before each token fetch, and when the registry refuses the Basic
credentials it was sent. A rotated password is so picked up without a remount.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import AsyncGenerator
from urllib.parse import parse_qs, urlsplit

import httpx
import trio

from ..errors import AuthError
from .credentials import Credentials

log = logging.getLogger(__name__)

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')

Origin = tuple[str, str, int]


def origin_of(url: httpx.URL | str) -> Origin:
    """(scheme, host, port) of a URL, with the scheme's default port filled in."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


def scope_for(request: httpx.Request) -> str:
    """The token scope a registry request needs, derived from its path and method."""
    path = request.url.path
    if path.startswith("/v2/_catalog"):
        return "registry:catalog:*"
    m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags)/", path)
    if not m:
        return ""
    name = m.group(1)
    if request.method in ("GET", "HEAD"):
        actions = "pull"
    elif request.method == "DELETE" and "/blobs/uploads/" not in path:
        actions = "delete,pull"
    else:
        actions = "pull,push"
    scopes = [f"repository:{name}:{actions}"]
    mount_from = parse_qs(urlsplit(str(request.url)).query).get("from")
    if mount_from:
        scopes.append(f"repository:{mount_from[0]}:pull")
    return " ".join(scopes)


def _token_from(response: httpx.Response) -> tuple[str, float] | None:
    if response.status_code != 200:
        log.debug("token service answered %s", response.status_code)
        return None
    try:
        body = response.json()
        token = body.get("token") or body.get("access_token")
        expires_in = float(body.get("expires_in") or 60)
    except (ValueError, AttributeError, TypeError):
        return None
    return (token, expires_in) if isinstance(token, str) and token else None


def basic_authorization(credentials: Credentials) -> str:
    """The Basic Authorization header value (what `httpx.BasicAuth` sends)."""
    userpass = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(userpass).decode("ascii")


class TokenCache:
    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}

    def get(self, scope: str) -> str | None:
        item = self._tokens.get(scope)
        if item and item[1] > time.monotonic():
            return item[0]
        return None

    def put(self, scope: str, token: str, expires_in: float) -> None:
        # Renew a little early so a token never expires in flight.
        self._tokens[scope] = (token, time.monotonic() + max(expires_in - 10, 1))


class RegistryAuth(httpx.Auth):
    """The auth flow of one registry, whose origin is `base` (e.g. https://host:port)."""

    def __init__(self, credentials: Credentials | None, base: str) -> None:
        self.credentials = credentials
        self.origin = origin_of(base)
        self.tokens = TokenCache()
        self.scheme: str | None = None  # learned from the registry's first challenge
        self._realms: set[Origin] = set()  # token services the registry named
        self._locks: dict[str, trio.Lock] = {}

    def _basic(self) -> str | None:
        if not self.credentials:
            return None
        return basic_authorization(self.credentials)

    async def _reread(self) -> bool:
        """Read the password file again, or ask the credential helper again (if there is
        one); True if the password changed."""
        if self.credentials is None or not self.credentials.renewable:
            return False
        try:
            fresh = await trio.to_thread.run_sync(self.credentials.fresh)
        except (OSError, ValueError) as exc:
            raise AuthError(f"cannot read the password file {self.credentials.password_file}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
        if not fresh.password:
            # Caught between a truncate and a write, or emptied: the last password stays.
            log.warning("password file %s is empty: keeping the password read before",
                        fresh.password_file)
            return False
        changed = (fresh.password, fresh.username) != (self.credentials.password,
                                                        self.credentials.username)
        if changed:
            log.info("%s changed: using the new password", f"password file {fresh.password_file}"
                     if fresh.password_file else f"credential helper {fresh.helper}")
        self.credentials = fresh
        return changed

    def ours(self, url: httpx.URL | str) -> bool:
        """The URL is on the registry's own origin."""
        return origin_of(url) == self.origin

    def is_realm(self, url: httpx.URL | str) -> bool:
        """The URL is on the origin of a token service the registry named."""
        return origin_of(url) in self._realms

    async def request_hook(self, request: httpx.Request) -> None:
        """Run on every request the client sends, redirects and token fetches included:
        an Authorization header goes only to the registry or a realm it named."""
        where = origin_of(request.url)
        if where != self.origin and where not in self._realms and \
                request.headers.pop("Authorization", None) is not None:
            log.debug("dropped credentials from a request to %s://%s:%d", *where)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scope = scope_for(request)
        self._attach(request, scope)
        response = yield request
        if response.status_code != 401:
            return
        if not self.ours(response.url):
            # A redirect target (blob storage) asking for credentials: it gets none, and
            # neither does the registry because of it. The 401 stands (client._check).
            log.debug("401 from %s, not the registry: not answered", response.url.host)
            return
        header = response.headers.get("www-authenticate", "")
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            self.scheme = "basic"
            basic = self._basic()
            if basic is not None and request.headers.get("authorization") == basic:
                # Refused: a rotated password, if a password file says so.
                basic = self._basic() if await self._reread() else None
            if basic is None:
                return  # nothing (new) to offer: let the caller see the 401
            request.headers["Authorization"] = basic
        elif scheme == "bearer" and "realm" in params:
            self._check_realm(params["realm"])
            self.scheme = "bearer"
            want = scope or params.get("scope", "")
            if params.get("scope") and params["scope"] not in want.split(" "):
                want = f"{want} {params['scope']}".strip()
            # Concurrent requests of one scope share one token fetch. The lock is held
            # across the yield: httpx drives this flow in the requesting task, so the
            # owner is the task that took it.
            async with self._locks.setdefault(scope, trio.Lock()):
                token = self.tokens.get(scope)
                if token is None or request.headers.get("authorization") == f"Bearer {token}":
                    await self._reread()
                    token_response = yield self._token_request(params, want)
                    await token_response.aread()
                    token = _token_from(token_response)
                    if token is None:
                        return  # the original 401 stands
                    self.tokens.put(scope, token[0], token[1])
                    token = token[0]
            request.headers["Authorization"] = f"Bearer {token}"
        else:
            return
        yield request

    def _check_realm(self, realm: str) -> None:
        """A realm the registry named may have our password, if it is reached as safely
        as the registry is."""
        where = origin_of(realm)
        if where[0] not in ("http", "https") or not where[1]:
            raise AuthError(f"the registry named a token service that is not an HTTP URL: {realm!r}")
        if self.origin[0] == "https" and where[0] != "https" and self.credentials:
            raise AuthError(
                f"the registry named an http:// token service ({where[1]}:{where[2]}) although "
                "it speaks HTTPS: galleryfs does not send credentials there in clear")
        self._realms.add(where)

    def _attach(self, request: httpx.Request, scope: str) -> None:
        if not self.ours(request.url):
            return
        if self.scheme == "basic":
            basic = self._basic()
            if basic:
                request.headers["Authorization"] = basic
        elif self.scheme == "bearer":
            token = self.tokens.get(scope)
            if token:
                request.headers["Authorization"] = f"Bearer {token}"

    def authorization(self, request: httpx.Request) -> str | None:
        """The Authorization header this flow would send first for the request."""
        self._attach(request, scope_for(request))
        return request.headers.get("authorization")

    async def basic_for_harbor(self) -> httpx.Auth | None:
        """Basic credentials for Harbor's REST API, once the registry is known to be a
        Harbor (its API answered like one): the API takes Basic, never a challenge."""
        await self._reread()
        if not self.credentials:
            return None
        return httpx.BasicAuth(self.credentials.username, self.credentials.password)

    def _token_request(self, params: dict[str, str], scope: str) -> httpx.Request:
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for item in scope.split():
            query.append(("scope", item))
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        return httpx.Request("GET", params["realm"], params=query, headers=headers)
