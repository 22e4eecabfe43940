"""A fault-injecting HTTP proxy in front of a real registry (the registry is never mocked).

Faults: answer the next N matching requests with a status (and Retry-After); redirect blob
GETs to another origin. Everything else is forwarded as-is.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler

import httpx

from tests.loopback import LoopbackServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length", "host"}


class FaultProxy(LoopbackServer):
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.faults: list[tuple[re.Pattern[str], int, dict[str, str]]] = []
        self.redirect_blobs: str | None = None
        # A stand-in for Harbor's REST API, answered from the real registry's catalog; with
        # `catalog_forbidden`, like a Harbor robot account that may not read the catalog.
        self.harbor_api = False
        self.catalog_forbidden = False
        self.harbor_requests = 0
        self.seen: list[tuple[str, str, int]] = []
        self.client = httpx.Client(timeout=30)
        self.host = f"127.0.0.1:{self._listen(self._serve)}"

    def close(self) -> None:
        self.client.close()

    def fail(self, pattern: str, times: int, status: int = 503, retry_after: str | None = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self.lock:
            self.faults.extend([(re.compile(pattern), status, headers)] * times)

    def _take_fault(self, method: str, path: str) -> tuple[int, dict[str, str]] | None:
        with self.lock:
            for i, (pattern, status, headers) in enumerate(self.faults):
                if pattern.search(f"{method} {path}"):
                    del self.faults[i]
                    return status, headers
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._take_fault(h.command, h.path)
        if self.harbor_api and h.path.startswith("/api/v2.0/"):
            status = self._harbor(h)
        elif self.catalog_forbidden and h.path.startswith("/v2/_catalog"):
            status = 403
            self._reply(h, status, {"Content-Type": "application/json"},
                        b'{"errors":[{"code":"DENIED","message":"catalog not allowed"}]}')
        elif fault:
            status, headers = fault
            self._reply(h, status, {**headers, "Content-Type": "application/json"},
                        b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}')
        elif self.redirect_blobs and h.command == "GET" and re.match(r"^/v2/.+/blobs/sha256:", h.path):
            self._reply(h, 307, {"Location": self.redirect_blobs + h.path}, b"")
            status = 307
        else:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            r = self.client.request(h.command, self.upstream + h.path, headers=headers, content=body)
            out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
            if "location" in r.headers and r.headers["location"].startswith(self.upstream):
                out["location"] = r.headers["location"][len(self.upstream):]
            status = r.status_code
            self._reply(h, status, out, r.content, head_length=r.headers.get("content-length"))
        with self.lock:
            self.seen.append((h.command, h.path, status))

    def _harbor(self, h: BaseHTTPRequestHandler) -> int:
        import json
        from urllib.parse import parse_qs, urlsplit

        self.harbor_requests += 1
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["10"])[0])
        repos = self.client.get(self.upstream + "/v2/_catalog?n=1000").json()["repositories"]
        if url.path == "/api/v2.0/projects":
            items = [{"name": p} for p in sorted({r.split("/", 1)[0] for r in repos})]
        else:
            m = re.match(r"^/api/v2.0/projects/([^/]+)/repositories$", url.path)
            if not m:
                self._reply(h, 404, {}, b"")
                return 404
            items = [{"name": r} for r in repos if r.startswith(m.group(1) + "/")]
        body = json.dumps(items[(page - 1) * size: page * size]).encode()
        self._reply(h, 200, {"Content-Type": "application/json", "X-Total-Count": str(len(items))}, body)
        return 200

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes,
               head_length: str | None = None) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        length = head_length if h.command == "HEAD" and head_length else str(len(body))
        h.send_header("Content-Length", length)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


class HeaderRecorder(LoopbackServer):
    """Another origin that serves blobs (by fetching them from the registry itself) and
    records the Authorization headers it was sent: a stand-in for blob storage behind a 307."""

    def __init__(self, upstream: str, auth: tuple[str, str] | None) -> None:
        self.authorizations: list[str | None] = []
        self.upstream = upstream
        self.client = httpx.Client(timeout=30, auth=auth)
        # "localhost" rather than 127.0.0.1: a different origin from the registry's.
        self.url = f"http://localhost:{self._listen(self._serve)}"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        self.authorizations.append(h.headers.get("authorization"))
        headers = {"Range": h.headers["range"]} if h.headers.get("range") else {}
        r = self.client.get(self.upstream + h.path, headers=headers)
        h.send_response(r.status_code)
        for k in ("content-type", "content-range"):
            if k in r.headers:
                h.send_header(k, r.headers[k])
        h.send_header("Content-Length", str(len(r.content)))
        h.end_headers()
        h.wfile.write(r.content)

    def close(self) -> None:
        self.client.close()
