"""Registry authentication as an httpx auth flow: Basic, and the Bearer-token dance.

A request goes out with whatever we already hold for its scope. On a 401 the challenge
says how to authenticate: Basic, or Bearer with realm/service/scope, in which case a
token is fetched from the realm (with Basic credentials if we have any, anonymously
otherwise), cached per scope, and the request is retried once.
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

from .credentials import Credentials

log = logging.getLogger(__name__)

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


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
    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self.tokens = TokenCache()
        self.scheme: str | None = None  # learned from the first challenge
        self._locks: dict[str, trio.Lock] = {}

    def _basic(self) -> str | None:
        if not self.credentials:
            return None
        return basic_authorization(self.credentials)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scope = scope_for(request)
        self._attach(request, scope)
        response = yield request
        if response.status_code != 401:
            return
        header = response.headers.get("www-authenticate", "")
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            self.scheme = "basic"
            basic = self._basic()
            if basic is None or request.headers.get("authorization") == basic:
                return  # nothing (new) to offer: let the caller see the 401
            request.headers["Authorization"] = basic
        elif scheme == "bearer" and "realm" in params:
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

    def _attach(self, request: httpx.Request, scope: str) -> None:
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
