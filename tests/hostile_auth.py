"""Hostile servers for the credential tests, loopback only: who may see a password.

- `Front`: a proxy in front of a real registry (never mocked) that records the
  Authorization header of every request it forwards, and can answer chosen blob GETs with
  a 302 to another origin, play Harbor's REST API, refuse that API with a bare 401, or
  hold one blob GET until a callback returns (a token expiring mid-command).
- `Stranger`: another origin (blob storage a registry redirects to, or a token "realm"
  nobody trusted) that records what it was sent and answers everything with a 401 and
  the challenge it is given; over TLS it plays a registry naming an http:// realm.
- `ShortTokenServer`: the harness's token service, with tokens the registry takes for
  `expires_in` seconds exactly.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.loopback import LoopbackServer
from tests.registry_harness import TokenServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "host"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorization: str | None


class _Server(LoopbackServer):
    """A loopback server that records who sent what Authorization."""

    def _listen(self, handle: Callable[[BaseHTTPRequestHandler], None],
                tls: ssl.SSLContext | None = None) -> int:
        port = super()._listen(handle, tls)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        return port

    def _record(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.seen.append(Seen(h.command, h.path, h.headers.get("authorization")))

    def authorizations(self, pattern: str = "") -> list[str | None]:
        with self.lock:
            return [s.authorization for s in self.seen if re.search(pattern, s.path)]



def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes,
           head_length: str | None = None) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", head_length if h.command == "HEAD" and head_length
                  else str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


class Stranger(_Server):
    """Another origin: records every request, answers each with 401 and `challenge`."""

    def __init__(self, challenge: str = 'Basic realm="stranger"',
                 tls: ssl.SSLContext | None = None) -> None:
        self.challenge = challenge
        port = self._listen(self._serve, tls)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        if length:
            h.rfile.read(length)
        self._record(h)
        _reply(h, 401, {"WWW-Authenticate": self.challenge, "Content-Type": "application/json"},
               b'{"errors":[{"code":"UNAUTHORIZED","message":"give me your password"}]}')


class Front(_Server):
    """The registry's origin as the client sees it: forwards to `upstream`, the real one."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = httpx.Client(timeout=30)
        self.redirect_to: str | None = None  # origin the blobs in `redirect_digests` go to
        self.redirect_digests: set[str] = set()
        # Harbor's REST API: anonymous callers see no project; (user, password) sees
        # them all; other credentials get a 401 without a challenge, as Harbor answers.
        self.harbor: tuple[str, str] | None = None
        self.api_unauthorized = False  # /api/v2.0/* answered 401, no challenge
        self.hold_blob: Callable[[], None] | None = None  # run once before a blob GET
        self.host = f"127.0.0.1:{self._listen(self._serve)}"
        self.url = f"http://{self.host}"

    def close(self) -> None:
        self.client.close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        self._record(h)
        path = urlsplit(h.path).path
        blob = re.match(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$", path)
        if path.startswith("/api/v2.0/") and (self.harbor or self.api_unauthorized):
            self._harbor_api(h)
            return
        if blob and h.command == "GET" and blob.group(1) in self.redirect_digests:
            _reply(h, 302, {"Location": f"{self.redirect_to}{h.path}"}, b"")
            return
        if blob and h.command == "GET" and self.hold_blob is not None:
            with self.lock:
                hold, self.hold_blob = self.hold_blob, None
            if hold is not None:
                hold()
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        r = self.client.request(h.command, self.upstream + h.path, headers=headers, content=body)
        out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
        if r.headers.get("location", "").startswith(self.upstream):
            out["location"] = r.headers["location"][len(self.upstream):]
        _reply(h, r.status_code, out, r.content, head_length=r.headers.get("content-length"))

    def _harbor_api(self, h: BaseHTTPRequestHandler) -> None:
        denied = b'{"errors":[{"code":"UNAUTHORIZED","message":"unauthorized"}]}'
        authorization = h.headers.get("authorization")
        if self.api_unauthorized or authorization and authorization != _basic(self.harbor):
            _reply(h, 401, {"Content-Type": "application/json"}, denied)
            return
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["10"])[0])
        repos = self.client.get(self.upstream + "/v2/_catalog?n=1000").json()["repositories"]
        items: list[dict[str, Any]] = []
        if authorization and url.path == "/api/v2.0/projects":
            items = [{"name": p, "project_id": i}
                     for i, p in enumerate(sorted({r.split("/", 1)[0] for r in repos}))]
        elif authorization:
            m = re.match(r"^/api/v2.0/projects/([^/]+)/repositories$", url.path)
            items = [{"name": r} for r in repos if m and r.startswith(m.group(1) + "/")]
        body = json.dumps(items[(page - 1) * size: page * size]).encode()
        _reply(h, 200, {"Content-Type": "application/json", "X-Total-Count": str(len(items))},
               body)


def _basic(creds: tuple[str, str] | None) -> str | None:
    if creds is None:
        return None
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


class ShortTokenServer(TokenServer):
    """Tokens the registry takes for `expires_in` seconds, then refuses.

    Distribution checks `exp` with 60 s of leeway for clock skew, so the `exp` claim is
    set that much earlier. `claimed` is the lifetime the answer states (`expires_in`):
    more than the real one plays a token service whose clock is behind, so a client
    that trusts it sends a token the registry refuses (the 401 path).
    """

    REGISTRY_LEEWAY = 60

    def __init__(self, lifetime: int, claimed: int | None = None, **kwargs: Any) -> None:
        super().__init__(expires_in=lifetime, **kwargs)
        self.claimed = claimed if claimed is not None else lifetime
        self.refused_after = 0.0  # wall-clock time after which every issued token is refused

    def make_token(self, access: list[dict[str, Any]], *, lifetime: int | None = None,
                   **kwargs: Any) -> str:
        life = self.expires_in if lifetime is None else lifetime
        now = int(time.time())  # what the harness's make_token reads as well
        with self._lock:
            self.refused_after = max(self.refused_after, now + life + 1.0)
        return super().make_token(access, lifetime=life - self.REGISTRY_LEEWAY, **kwargs)

    def _token_response(self, username: str, service: str | None,
                        scopes: list[str]) -> dict[str, Any]:
        body = super()._token_response(username, service, scopes)
        body["expires_in"] = self.claimed
        return body

    def wait_until_expired(self, bound: float = 15.0) -> None:
        """Until every token issued so far is refused: a wait on the clock, bounded."""
        deadline = time.monotonic() + bound
        while time.time() <= self.refused_after:
            assert time.monotonic() < deadline, "tokens did not expire in time"
            time.sleep(0.05)
