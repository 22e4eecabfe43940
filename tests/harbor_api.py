"""HarborAPIStandIn: a loopback service that answers the part of Harbor's published REST
API (`/api/v2.0`) that galleryfs uses, in front of a real registry (the registry is never
mocked: `/v2/` goes to it unchanged, except the catalog, which Harbor keeps to admins).

What it follows, read in goharbor/harbor (api/v2.0/swagger.yaml and src/, at c50c7dd):
- `GET /api/v2.0/projects` and `GET /api/v2.0/projects/{project_name}/repositories`:
  `page` (default 1), `page_size` (default 10, `maximum: 100`: more is refused by
  go-swagger's parameter validation, which Harbor answers with 422), `X-Total-Count`, and
  a `Link` header (handler/base.go `Links`) with URLs relative to the host, built from
  the request's path and query (keys sorted, as Go's `url.Values.Encode`), `rel="prev"`
  before `rel="next"`, joined by " , " (lib/link.go); no Link when nothing else exists.
- Who sees which projects (handler/project.go `ListProjects`): anonymous callers the
  public ones; a user the public ones and those it is a member of; a robot those in its
  permissions and the public ones; a system admin all. Credentials that do not
  authenticate make an anonymous caller, not a 401 (middleware/security: every
  generator returns nil, the unauthorized context follows).
- A project's repositories (`RequireProjectAccess(list, repository)`): 401 to an
  anonymous caller without access, 403 to an authenticated one; a project that does not
  exist answers the same (`HasProjectPermission` is false). Repository objects carry the
  full name, `project/a/b`.
- One repository, `GET /api/v2.0/projects/{p}/repositories/{name}`: a name with slashes
  is encoded twice (`a%252Fb`); encoded once, the router sees more path segments (404).
- `/v2/_catalog` for anyone but a system admin (middleware/v2auth): 401 with
  `Www-Authenticate: Basic realm="harbor"` and "unauthorized to list catalog".
- `GET /api/v2.0/users/current`: 401 anonymous, 412 for a robot (not a user), else the
  user (handler/user.go).
- Errors as `{"errors": [{"code": ..., "message": ...}]}` (lib/http/error.go).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx

from tests.loopback import LoopbackServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length", "host"}
MAX_PAGE_SIZE = 100  # swagger.yaml, parameters.pageSize.maximum
DEFAULT_PAGE_SIZE = 10  # swagger.yaml, parameters.pageSize.default


@dataclass
class Account:
    """A Harbor user or robot (`robot$project+name`) as the API sees it."""

    password: str
    admin: bool = False
    # Projects it is a member of (a user) or has permissions in (a robot), and what it
    # may do there: "list" (the project's repositories), "pull".
    access: dict[str, set[str]] = field(default_factory=dict)
    name: str = ""  # filled in from the accounts table

    @property
    def robot(self) -> bool:
        return self.name.startswith("robot$")  # Harbor's default robot prefix


@dataclass
class Seen:
    method: str
    path: str
    status: int
    authorization: str | None


class HarborAPIStandIn(LoopbackServer):
    """Use as `with HarborAPIStandIn(registry.url, projects={...}, accounts={...}) as harbor:`;
    clients talk to `harbor.host`. `upstream_auth` reads the real registry's catalog (to
    know each project's repositories); `projects` maps a project name to public (True) or
    private (False); a repository whose first segment is no project is not shown."""

    def __init__(self, upstream: str, *, projects: dict[str, bool],
                 accounts: dict[str, Account] | None = None,
                 upstream_auth: tuple[str, str] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.projects = projects
        self.accounts = accounts or {}
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.client = httpx.Client(timeout=30)
        self.upstream_auth = upstream_auth
        self.host = f"127.0.0.1:{self._listen(self._serve)}"
        self.url = f"http://{self.host}"

    def close(self) -> None:
        self.client.close()

    def requests(self, pattern: str) -> list[Seen]:
        """The requests whose `METHOD path?query` matches `pattern`, in order."""
        with self.lock:
            return [s for s in self.seen if re.search(pattern, f"{s.method} {s.path}")]

    # ---- serving ------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urlsplit(h.path).path
        who = self._identity(h.headers.get("authorization"))
        if path.startswith("/api/v2.0/"):
            status, headers, out = self._api(h, who)
        elif path.rstrip("/") == "/v2/_catalog" and not (who and who.admin):
            status, headers, out = _error(401, "UNAUTHORIZED", "unauthorized to list catalog")
            headers["Www-Authenticate"] = 'Basic realm="harbor"'
        else:
            status, headers, out = self._forward(h, body)
        _reply(h, status, headers, out)
        with self.lock:
            self.seen.append(Seen(h.command, h.path, status, h.headers.get("authorization")))

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        r = self.client.request(h.command, self.upstream + h.path, headers=headers, content=body)
        out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
        if r.headers.get("location", "").startswith(self.upstream):
            out["location"] = r.headers["location"][len(self.upstream):]
        if h.command == "HEAD" and "content-length" in r.headers:
            out["Content-Length"] = r.headers["content-length"]
        return r.status_code, out, r.content

    def _identity(self, authorization: str | None) -> Account | None:
        """The account the Basic credentials name, or None (anonymous) when there are none
        or they do not authenticate: Harbor's API then serves the caller as anonymous."""
        if not authorization or not authorization.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        account = self.accounts.get(user)
        if account is None or account.password != password:
            return None
        account.name = user
        return account

    def _api(self, h: BaseHTTPRequestHandler, who: Account | None) -> tuple[int, dict[str, str], bytes]:
        if h.command != "GET":
            return _error(405, "METHOD_NOT_ALLOWED", "method not allowed")
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query))
        try:
            page = int(query.get("page", "1"))
            size = int(query.get("page_size", str(DEFAULT_PAGE_SIZE)))
        except ValueError:
            return _error(422, "UNPROCESSABLE_ENTITY",
                          "validation failure list:\npage in query must be of type int64")
        if size > MAX_PAGE_SIZE:
            return _error(422, "UNPROCESSABLE_ENTITY", "validation failure list:\n"
                          f"page_size in query should be less than or equal to {MAX_PAGE_SIZE}")
        page = max(page, 1)
        # Routes match the decoded path, as Go's router does: `a%2Fb` becomes two segments.
        parts = unquote(url.path).split("/")[3:]  # after "", "api", "v2.0"
        if parts == ["users", "current"]:  # handler/user.go GetCurrentUserInfo
            if who is None:
                return _error(401, "UNAUTHORIZED", "unauthorized")
            if who.robot:
                return _error(412, "PRECONDITION", "get current user not available for "
                              "security context: robot")
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"username": who.name, "sysadmin_flag": who.admin}).encode()
        if parts == ["projects"]:
            items = [self._project(name) for name in sorted(self.projects) if self._visible(name, who)]
        elif len(parts) == 3 and parts[0] == "projects" and parts[2] == "repositories":
            project = parts[1]
            if not self._may_list(project, who):
                return (_error(401, "UNAUTHORIZED", "unauthorized") if who is None
                        else _error(403, "FORBIDDEN", "forbidden"))
            items = [self._repository(project, r) for r in self._repositories(project)]
        elif len(parts) == 4 and parts[0] == "projects" and parts[2] == "repositories":
            project, name = parts[1], unquote(parts[3])  # the second decoding: Harbor's own
            if not self._may_list(project, who):
                return (_error(401, "UNAUTHORIZED", "unauthorized") if who is None
                        else _error(403, "FORBIDDEN", "forbidden"))
            full = f"{project}/{name}"
            if full not in self._repositories(project):
                return _error(404, "NOT_FOUND", f"repository {full} not found")
            return 200, {"Content-Type": "application/json"}, json.dumps(
                self._repository(project, full)).encode()
        else:
            return _error(404, "NOT_FOUND", "not found")
        headers = {"Content-Type": "application/json"}
        total = self.total_count(items)
        if total is not None:
            headers["X-Total-Count"] = str(total)
        link = self.links(url.path, query, len(items), page, size)
        if link:
            headers["Link"] = link
        return 200, headers, json.dumps(self.page_of(items, page, size)).encode()

    # Hooks a hostile variant overrides (tests/test_harbor_api.py).
    def total_count(self, items: list[Any]) -> int | None:
        return len(items)

    def page_of(self, items: list[Any], page: int, size: int) -> list[Any]:
        return items[(page - 1) * size: page * size]

    def links(self, path: str, query: dict[str, str], total: int, page: int, size: int) -> str:
        """Harbor's `Links(...).String()` for this request."""
        def at(n: int) -> str:
            q = {**query, "page": str(n), "page_size": str(size)}
            return f"<{path}?{'&'.join(f'{k}={q[k]}' for k in sorted(q))}>"

        links = []
        if page > 1 and (page - 1) * size < total:
            links.append(f'{at(page - 1)}; rel="prev"')
        if size * page < total:
            links.append(f'{at(page + 1)}; rel="next"')
        return " , ".join(links)

    # ---- what exists and who may see it ---------------------------------------------------

    def _visible(self, project: str, who: Account | None) -> bool:
        if project not in self.projects:
            return False
        return self.projects[project] or (who is not None and (who.admin or project in who.access))

    def _may_list(self, project: str, who: Account | None) -> bool:
        if project not in self.projects:
            return False
        if self.projects[project] or (who is not None and who.admin):
            return True  # a public project's repositories are listed to anyone
        return who is not None and "list" in who.access.get(project, set())

    def _repositories(self, project: str) -> list[str]:
        r = self.client.get(f"{self.upstream}/v2/_catalog?n=1000", auth=self.upstream_auth)
        r.raise_for_status()
        return sorted(n for n in r.json().get("repositories") or [] if n.startswith(project + "/"))

    def _project(self, name: str) -> dict[str, Any]:
        return {"project_id": sorted(self.projects).index(name) + 1, "name": name,
                "owner_name": "admin", "repo_count": len(self._repositories(name)),
                "metadata": {"public": "true" if self.projects[name] else "false"}}

    def _repository(self, project: str, name: str) -> dict[str, Any]:
        return {"id": abs(hash(name)) % 100_000, "name": name, "artifact_count": 1,
                "project_id": sorted(self.projects).index(project) + 1, "pull_count": 0}


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return status, {"Content-Type": "application/json; charset=utf-8"}, body


def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    h.send_response(status)
    for k, v in headers.items():
        if k.lower() != "content-length":
            h.send_header(k, v)
    length = headers.get("Content-Length") if h.command == "HEAD" else None
    h.send_header("Content-Length", length or str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
