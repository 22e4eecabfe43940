"""A small registry that says what a test tells it to: tags a real registry would refuse
to store (a NUL, `a/b`, `sha256:<hex>`), listings of any shape.

It speaks just enough of the distribution API for `ls`, `pull` and the mount: `/v2/`,
`/v2/_catalog`, `/v2/<name>/tags/list`, manifests by tag or digest (GET, HEAD) and blobs
(GET, with a single `Range`). Everything comes from dicts the test fills; loopback only.
Not Harbor: `/api/v2.0/...` answers 404.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import unquote

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Repo:
    # Exactly what tags/list answers (any JSON value: the test decides its shape).
    tags: Any = field(default_factory=list)
    # Tag or digest -> manifest bytes.
    manifests: dict[str, bytes] = field(default_factory=dict)


class HostileRegistry:
    """`with HostileRegistry() as reg:` ... `reg.host` is `127.0.0.1:PORT` (plain HTTP)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- content -------------------------------------------------------------------

    def blob(self, data: bytes) -> dict:
        """Store a blob; its descriptor (without media type)."""
        d = digest_of(data)
        self.blobs[d] = data
        return {"digest": d, "size": len(data)}

    def manifest(self, repo: str, body: bytes, *tags: Any) -> str:
        """Store a manifest under its digest and `tags` (listed as given, even when no
        real registry would keep such a tag); its digest."""
        r = self.repos.setdefault(repo, Repo())
        d = digest_of(body)
        r.manifests[d] = body
        for tag in tags:
            if isinstance(tag, str):
                r.manifests[tag] = body
            r.tags.append(tag)
        return d

    # ---- serving -------------------------------------------------------------------

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        registry = self

        class Handler(_Handler):
            owner = registry

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_MANIFEST = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>.+)$", re.S)
_BLOB = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)$")
_TAGS = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    owner: HostileRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _not_found(self, head: bool = False) -> None:
        self._send(404, b'{"errors":[{"code":"NOT_FOUND","message":"not here"}]}', head=head)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path = unquote(self.path.split("?", 1)[0])
        self.owner.requests.append(path)
        if path == "/v2/":
            return self._send(200, b"{}", head=head)
        if path == "/v2/_catalog":
            body = json.dumps({"repositories": sorted(self.owner.repos)}).encode()
            return self._send(200, body, head=head)
        if m := _TAGS.match(path):
            repo = self.owner.repos.get(m["name"])
            if repo is None:
                return self._not_found(head)
            body = json.dumps({"name": m["name"], "tags": repo.tags}).encode()
            return self._send(200, body, head=head)
        if m := _MANIFEST.match(path):
            repo = self.owner.repos.get(m["name"])
            body = repo.manifests.get(m["ref"]) if repo else None
            if body is None:
                return self._not_found(head)
            return self._send(200, body, OCI_MANIFEST, {"Docker-Content-Digest": digest_of(body)},
                              head=head)
        if m := _BLOB.match(path):
            data = self.owner.blobs.get(m["digest"])
            if data is None:
                return self._not_found(head)
            r = _RANGE.match(self.headers.get("Range", ""))
            if r and not head:
                start = int(r[1])
                end = min(int(r[2]) if r[2] else len(data) - 1, len(data) - 1)
                return self._send(206, data[start:end + 1], "application/octet-stream",
                                  {"Content-Range": f"bytes {start}-{end}/{len(data)}",
                                   "Accept-Ranges": "bytes"})
            return self._send(200, data, "application/octet-stream",
                              {"Accept-Ranges": "bytes", "Docker-Content-Digest": m["digest"]},
                              head=head)
        self._not_found(head)
