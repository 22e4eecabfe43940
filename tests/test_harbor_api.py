"""Harbor as it is: a robot account (`robot$g+ci`) that may not read the catalog lists and
mounts through Harbor's projects API, paged as Harbor pages it (`page`/`page_size` at
most 100, `X-Total-Count`, relative `Link`s joined by " , "). The API is
tests/harbor_api.py's stand-in, following Harbor's published API, in front of the real
registry, whose htpasswd holds the robot."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from galleryfs import gallery
from galleryfs.cli import main
from galleryfs.errors import RegistryError
from galleryfs.reference import parse
from galleryfs.registry import client as client_module
from galleryfs.registry.client import ClientOptions, RegistryClient, _next_link
from galleryfs.registry.credentials import Credentials
from tests.harbor_api import Account, HarborAPIStandIn
from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry

ROBOT = "robot$g+ci"  # Harbor's robot names: `robot$` + project + `+` + name
MODELS = [f"g/m{i:03}" for i in range(104)] + ["g/llm/base"]  # 105: two pages of 100


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The real registry, with htpasswd auth for the robot only, holding the 105 models
    of project g and one in each other project (shared by the module: tests only read)."""
    reg = Registry("basic", username=ROBOT)
    try:
        reg.start()
        home = tmp_path_factory.mktemp("harbor")
        with pytest.MonkeyPatch.context() as env:  # push's digest cache: not the real home
            env.setenv("XDG_CACHE_HOME", str(home / "cache"))
            env.setenv("XDG_CONFIG_HOME", str(home / "config"))
            _fill(reg, _model(home), [*MODELS, "pub/shared", "other/hidden", "loose/x"])
        yield reg
    finally:
        reg.close()


def _model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "weights.bin").write_bytes(b"\x80" + os.urandom(20_000))
    return src


def _fill(reg: Registry, src: Path, names: list[str]) -> None:
    """`names[0]` pushed by galleryfs; the others are the same revision, made cheaply: the
    blobs mounted across repositories and the manifest PUT again."""
    first, rest = names[0], names[1:]

    async def push() -> None:
        creds = Credentials(*reg.auth) if reg.auth else None
        async with RegistryClient(reg.host, ClientOptions(plain_http=True, credentials=creds)) as c:
            await gallery.push(c, src, parse(f"{reg.host}/{first}:v1"))

    trio.run(push)
    with httpx.Client(base_url=reg.url, auth=reg.auth, timeout=30) as http:
        accept = "application/vnd.oci.image.manifest.v1+json"
        r = http.get(f"/v2/{first}/manifests/v1", headers={"Accept": accept})
        r.raise_for_status()
        manifest, media_type = r.content, r.headers["content-type"]
        body = json.loads(manifest)
        digests = [body["config"]["digest"], *(layer["digest"] for layer in body["layers"])]
        for name in rest:
            for d in digests:
                m = http.post(f"/v2/{name}/blobs/uploads/?mount={d}&from={first}")
                assert m.status_code == 201, m.text
            http.put(f"/v2/{name}/manifests/v1", content=manifest,
                     headers={"Content-Type": media_type}).raise_for_status()


def _harbor(reg: Registry, **accounts: Account) -> HarborAPIStandIn:
    # Three projects: the robot's (private), a public one, and a private one it has no
    # permission in.
    return HarborAPIStandIn(reg.url, projects={"g": False, "pub": True, "other": False},
                            accounts={ROBOT: Account(reg.password or "", access={"g": {"list", "pull"}}),
                                      **accounts},
                            upstream_auth=reg.auth)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _ls(host: str, *args: str, password: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    code = main(["ls", host, *args, "--plain-http", "-u", ROBOT, "--password-stdin"])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the robot lists, page by page, without the catalog -----------------------------------


def test_a_robot_lists_galleries_and_models_through_the_projects_api(
        filled: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reg = filled
    with _harbor(reg) as harbor:
        code, out, err = _ls(harbor.host, "--json", password=reg.password or "",
                             monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        # The robot sees its project and the public one; not "other", nor repositories
        # outside any project.
        assert json.loads(out) == [{"gallery": "g", "models": 105}, {"gallery": "pub", "models": 1}]
        # Two pages of g's repositories, the second one by Harbor's Link; page_size never
        # above Harbor's 100 (the stand-in answers 422 to more, as Harbor does).
        pages = harbor.requests(r"^GET /api/v2\.0/projects/g/repositories\?")
        assert [s.path.split("?", 1)[1] for s in pages][:2] == ["page=1&page_size=100",
                                                                "page=2&page_size=100"]
        assert all(s.status == 200 for s in harbor.requests(r"^GET /api/v2\.0/projects"))
        # The catalog (admin-only on Harbor) was never asked.
        assert not harbor.requests("/v2/_catalog")
        # The probe went anonymously; then the robot's name reached the API intact.
        api = harbor.requests(r"^GET /api/v2\.0/projects\?")
        assert api[0].authorization is None
        assert api[1].authorization == _basic(ROBOT, reg.password or "")


def test_ls_of_one_project_pages_through_that_project_only(
        filled: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reg = filled
    with _harbor(reg) as harbor:
        code, out, err = _ls(harbor.host + "/g", "--json", password=reg.password or "",
                             monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        listed = json.loads(out)
        names = sorted(m if isinstance(m, str) else m.get("model") or m.get("name") for m in listed)
        assert len(names) == 105 and "llm/base" in str(names) and "m103" in str(names)
        asked = [s.path for s in harbor.requests("^GET /api/")]
        # One project's listing: not every project's repositories to show one.
        assert not any("/projects/pub/" in p or "/projects/other/" in p for p in asked), asked
        assert len(harbor.requests(r"/projects/g/repositories\?")) == 2


def test_a_project_the_robot_may_pull_from_but_not_list_is_left_out(
        filled: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Harbor shows a robot every project it has a permission in; one with "pull" and not
    "list repository" answers 403 to the repositories listing. The other projects still
    list (the catalog is no way out: it is admin-only)."""
    reg = filled
    with _harbor(reg) as harbor:
        harbor.accounts[ROBOT].access["other"] = {"pull"}
        with caplog.at_level(logging.WARNING, logger="galleryfs"):
            code, out, err = _ls(harbor.host, "--json", password=reg.password or "",
                                 monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        assert json.loads(out) == [{"gallery": "g", "models": 105}, {"gallery": "pub", "models": 1}]
        assert [s.status for s in harbor.requests("/projects/other/repositories")] == [403]
        assert "project other (HTTP 403)" in caplog.text


def test_robot_credentials_from_auth_json_and_docker_config(
        filled: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`robot$g+ci` through `galleryfs login` (auth.json) and through Docker's config.json:
    the `$` and `+` come back out as they went in."""
    reg = filled
    with _harbor(reg) as harbor:
        monkeypatch.setattr(sys, "stdin", io.StringIO((reg.password or "") + "\n"))
        assert main(["login", harbor.host, "--plain-http", "-u", ROBOT, "--password-stdin"]) == 0
        stored = json.loads((tmp_path / "config" / "galleryfs" / "auth.json").read_text())
        (entry,) = stored["auths"].values()
        assert base64.b64decode(entry["auth"]).decode() == f"{ROBOT}:{reg.password}"
        capsys.readouterr()
        assert main(["ls", harbor.host, "--plain-http", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0] == {"gallery": "g", "models": 105}
        (tmp_path / "config" / "galleryfs" / "auth.json").unlink()

        docker = tmp_path / "docker"
        docker.mkdir()
        auth = base64.b64encode(f"{ROBOT}:{reg.password}".encode()).decode()
        (docker / "config.json").write_text(json.dumps({"auths": {harbor.host: {"auth": auth}}}))
        before = len(harbor.seen)
        assert main(["ls", f"{harbor.host}/g/m042", "--plain-http", "--json"]) == 0
        assert "v1" in capsys.readouterr().out
        sent = {s.authorization for s in harbor.seen[before:] if s.authorization}
        assert sent == {_basic(ROBOT, reg.password or "")}


def test_a_robot_through_a_token_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Harbor's registry takes Bearer tokens: the robot's name reaches the token service
    in its Basic header, intact (the service checks it), and the push and pull work."""
    reg = Registry("token", username=ROBOT)
    try:
        reg.start()
        src = _model(tmp_path)
        monkeypatch.setattr(sys, "stdin", io.StringIO((reg.password or "") + "\n"))
        assert main(["push", str(src), f"{reg.host}/g/m:v1", "--plain-http", "--quiet",
                     "-u", ROBOT, "--password-stdin"]) == 0
        monkeypatch.setattr(sys, "stdin", io.StringIO((reg.password or "") + "\n"))
        assert main(["pull", f"{reg.host}/g/m:v1", str(tmp_path / "out"), "--plain-http",
                     "--quiet", "-u", ROBOT, "--password-stdin"]) == 0
        assert (tmp_path / "out" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
        monkeypatch.setattr(sys, "stdin", io.StringIO("not-the-password\n"))
        assert main(["pull", f"{reg.host}/g/m:v1", str(tmp_path / "out2"), "--plain-http",
                     "-u", ROBOT, "--password-stdin"]) != 0  # the service does check
        capsys.readouterr()
    finally:
        reg.close()


def test_a_refused_robot_is_named_as_given(filled: Registry, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Which account was refused, with its `$` and `+`: with several robots stored (auth.json,
    Docker's config, a helper), the first thing to check."""
    code, out, err = _ls(f"{filled.host}/g/m000", password="not-the-password",
                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and f"wrong username or password (as {ROBOT})" in err, err
    assert "not-the-password" not in err + out


def test_a_robot_whose_secret_harbor_does_not_take_is_told_so(
        filled: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Harbor's API serves credentials it does not take as anonymous: public projects
    only, no error. galleryfs asks who it is, once, rather than show a partial listing."""
    with _harbor(filled) as harbor:
        code, out, err = _ls(harbor.host, "--json", password="not-the-password",
                             monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and f"wrong username or password (as {ROBOT})" in err, (out, err)
        assert [s.status for s in harbor.requests("/users/current")] == [401]
        # Right secret: the robot's 412 ("not a user") is fine, and asked only once.
        code, out, err = _ls(harbor.host, "--json", password=filled.password or "",
                             monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0 and json.loads(out)[0] == {"gallery": "g", "models": 105}, err
        assert [s.status for s in harbor.requests("/users/current")] == [401, 412]


# ---- the mount --------------------------------------------------------------------------


@pytest.mark.mount
def test_a_robot_mounts_through_the_projects_api(filled: Registry, tmp_path: Path) -> None:
    reg = filled
    env = isolated_env(tmp_path)
    with _harbor(reg) as harbor:
        r = galleryfs("login", harbor.host, "--plain-http", "-u", ROBOT, "--password-file",
                      str(_password_file(tmp_path, reg.password or "")), env=env)
        assert r.returncode == 0, r.stderr
        with mounted(harbor.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                     str(tmp_path / "fscache")) as mnt:
            assert sorted(os.listdir(mnt)) == ["g", "pub"]
            models = sorted(os.listdir(mnt / "g"))
            assert len(models) == 105 and models[-1] == "m103" and "llm" in models
            assert (mnt / "g" / "m077" / "v1" / "config.json").read_text() == '{"model_type": "bert"}'
            assert (mnt / "g" / "llm" / "base" / "v1" / "weights.bin").stat().st_size == 20_001
        assert harbor.requests(r"/projects/g/repositories\?page=2&page_size=100")
        assert not harbor.requests("/v2/_catalog")


def _password_file(tmp_path: Path, password: str) -> Path:
    path = tmp_path / "robot-secret"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


# ---- a Harbor that pages on forever -------------------------------------------------------


class _FirstPageForever(HarborAPIStandIn):
    """A Harbor (or a cache in front of one keyed on the path alone) that answers page 1
    whatever page is asked, with the right total and a Link to the next page."""

    def page_of(self, items: list[Any], page: int, size: int) -> list[Any]:
        return items[:size]


class _NoEnd(HarborAPIStandIn):
    """Full pages, each linking to one more, and no X-Total-Count."""

    def page_of(self, items: list[Any], page: int, size: int) -> list[Any]:
        return items[:size]

    def links(self, path: str, query: dict[str, str], total: int, page: int, size: int) -> str:
        return f'<{path}?page={page + 1}&page_size={size}>; rel="next"'

    def total_count(self, items: list[Any]) -> int | None:
        return None


def _robot_listing(harbor: HarborAPIStandIn, reg: Registry) -> list[str]:
    async def run() -> list[str]:
        opts = ClientOptions(plain_http=True, credentials=Credentials(ROBOT, reg.password or ""))
        async with RegistryClient(harbor.host, opts) as client:
            with trio.fail_after(20):  # a listing that never ends fails here, not by hanging
                return await client.repositories()

    return trio.run(run)


def test_a_page_served_again_and_again_ends_at_the_total(filled: Registry) -> None:
    with _FirstPageForever(filled.url, projects={"g": False},
                           accounts={ROBOT: Account(filled.password or "", access={"g": {"list"}})},
                           upstream_auth=filled.auth) as harbor:
        repos = _robot_listing(harbor, filled)
        assert len(repos) == 100  # what it said, once; not the same page forever
        assert len(harbor.requests("/projects/g/repositories")) == 2


def test_a_listing_that_links_on_forever_stops_with_an_error(
        filled: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_PAGES", 5, raising=False)
    with _NoEnd(filled.url, projects={"g": False},
                accounts={ROBOT: Account(filled.password or "", access={"g": {"list"}})},
                upstream_auth=filled.auth) as harbor:
        with pytest.raises(RegistryError, match="more than 5 pages"):
            _robot_listing(harbor, filled)
        # The probe, then five pages of projects (each links to one more), no more.
        assert len(harbor.requests(r"^GET /api/v2\.0/projects")) == 6


class _Lying(HarborAPIStandIn):
    """A server posing as Harbor: a project name Harbor would refuse (a path of its own),
    and a project whose listing claims another project's repository."""

    def _repositories(self, project: str) -> list[str]:
        names = super()._repositories(project)
        return [*names, "other/hidden"] if project == "pub" else names


def test_names_a_lying_harbor_lists_stay_inside_their_project(
        filled: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    with _Lying(filled.url, projects={"g": False, "pub": True, "x/../../../v2/_catalog?": True},
                accounts={ROBOT: Account(filled.password or "", access={"g": {"list"}})},
                upstream_auth=filled.auth) as harbor:
        with caplog.at_level(logging.WARNING, logger="galleryfs"):
            code, out, err = _ls(harbor.host, "--json", password=filled.password or "",
                                 monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        assert json.loads(out) == [{"gallery": "g", "models": 105}, {"gallery": "pub", "models": 1}]
        assert not harbor.requests("_catalog") and not harbor.requests(r"/projects/x")
        assert "ignoring a Harbor project named 'x/../../../v2/_catalog?'" in caplog.text
        assert "ignoring repository 'other/hidden' listed in Harbor project pub" in caplog.text


# ---- Link headers as Harbor writes them -------------------------------------------------


def _response(link: str) -> httpx.Response:
    url = "http://reg.example/api/v2.0/projects?page=2&page_size=100"
    return httpx.Response(200, headers={"Link": link}, request=httpx.Request("GET", url))


def test_the_next_link_is_the_one_marked_next_not_the_first() -> None:
    both = ('</api/v2.0/projects?page=1&page_size=100>; rel="prev" , '
            '</api/v2.0/projects?page=3&page_size=100>; rel="next"')
    assert _next_link(_response(both), "http://reg.example") == \
        "http://reg.example/api/v2.0/projects?page=3&page_size=100"
    assert _next_link(_response('</api/v2.0/projects?page=1&page_size=100>; rel="prev"'),
                      "http://reg.example") is None
    # A query with commas (Harbor's `q=name=~a,b`) does not split a link.
    comma = '</api/v2.0/projects?page=3&page_size=100&q=name=~a,b>; rel="next"'
    assert _next_link(_response(comma), "http://reg.example") == \
        "http://reg.example/api/v2.0/projects?page=3&page_size=100&q=name=~a,b"
    # Distribution's own form, and one to another origin (never followed: it would get
    # our credentials).
    assert _next_link(_response('</v2/_catalog?last=a&n=1>; rel="next"'), "http://reg.example") == \
        "http://reg.example/v2/_catalog?last=a&n=1"
    assert _next_link(_response('<http://elsewhere.example/v2/_catalog?n=1>; rel="next"'),
                      "http://reg.example") is None


# ---- the stand-in answers as Harbor does --------------------------------------------------


def test_the_stand_in_answers_as_harbors_api_does(filled: Registry) -> None:
    """What the tests above lean on: Harbor's paging, visibility, 422, double-encoded
    names and the admin-only catalog, as read in Harbor's source."""
    reg = filled
    with _harbor(reg) as harbor, httpx.Client(base_url=harbor.url, timeout=30) as http:
        robot = (ROBOT, reg.password or "")
        r = http.get("/api/v2.0/projects/g/repositories", params={"page": 2, "page_size": 50}, auth=robot)
        assert r.headers["X-Total-Count"] == "105" and len(r.json()) == 50
        assert r.headers["Link"] == (
            '</api/v2.0/projects/g/repositories?page=1&page_size=50>; rel="prev" , '
            '</api/v2.0/projects/g/repositories?page=3&page_size=50>; rel="next"')
        assert http.get("/api/v2.0/projects", params={"page_size": 101}).status_code == 422
        assert [p["name"] for p in http.get("/api/v2.0/projects").json()] == ["pub"]
        wrong = http.get("/api/v2.0/projects", auth=(ROBOT, "wrong"))  # anonymous, not 401
        assert wrong.status_code == 200 and [p["name"] for p in wrong.json()] == ["pub"]
        assert http.get("/api/v2.0/projects/g/repositories").status_code == 401
        assert http.get("/api/v2.0/projects/other/repositories", auth=robot).status_code == 403
        assert http.get("/api/v2.0/projects/g/repositories/llm%252Fbase", auth=robot).json()["name"] == \
            "g/llm/base"
        assert http.get("/api/v2.0/projects/g/repositories/llm%2Fbase", auth=robot).status_code == 404
        catalog = http.get("/v2/_catalog", auth=robot)
        assert catalog.status_code == 401 and catalog.headers["www-authenticate"] == 'Basic realm="harbor"'
        assert http.get("/v2/g/m001/tags/list", auth=robot).json()["tags"] == ["v1"]
