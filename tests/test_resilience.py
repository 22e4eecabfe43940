"""Retries, redirects and pagination against the real registry, through a fault proxy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from galleryfs import gallery
from galleryfs.cli import main
from galleryfs.errors import RegistryError
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.retry import RetryPolicy
from tests.faultproxy import FaultProxy, HeaderRecorder
from tests.harbor_api import HarborAPIStandIn
from tests.registry_harness import Registry


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def _model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "weights.bin").write_bytes(b"\x80" + os.urandom(200_000))
    return src


def test_transient_errors_are_retried(registry: Registry, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = _model(tmp_path)
    with FaultProxy(registry.url) as proxy:
        proxy.fail(r"^HEAD /v2/g/m/blobs/", 2, 503)
        proxy.fail(r"^PUT /v2/g/m/manifests/", 1, 429, retry_after="0")
        proxy.fail(r"^GET /v2/g/m/blobs/", 2, 502)
        assert main(["push", str(src), f"{proxy.host}/g/m:v1", "--plain-http", "--quiet"]) == 0
        assert main(["pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out"), "--plain-http", "--quiet"]) == 0
        assert proxy.faults == []  # every injected fault was hit, and survived
        statuses = [s for _, _, s in proxy.seen]
        assert statuses.count(503) == 2 and statuses.count(429) == 1 and statuses.count(502) == 2
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()


def test_persistent_errors_give_up_with_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    async def run() -> None:
        with FaultProxy(registry.url) as proxy:
            proxy.fail(r"^GET /v2/_catalog", 50, 503)
            opts = ClientOptions(plain_http=True, retry=RetryPolicy(attempts=3, base=0.01, cap=0.05))
            async with RegistryClient(proxy.host, opts) as client:
                with pytest.raises(RegistryError, match="503"):
                    await client.catalog()
            assert len(proxy.seen) == 3

    trio.run(run)


def test_redirect_to_other_origin_drops_authorization(basic_registry: Registry, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reg = basic_registry
    src = _model(tmp_path)
    import io
    import sys

    with FaultProxy(reg.url) as proxy, HeaderRecorder(reg.url, (reg.username, reg.password)) as store:
        args = ["--plain-http", "--quiet", "-u", reg.username, "--password-stdin"]
        monkeypatch.setattr(sys, "stdin", io.StringIO(reg.password + "\n"))
        assert main(["push", str(src), f"{proxy.host}/g/m:v1", *args]) == 0
        proxy.redirect_blobs = store.url
        monkeypatch.setattr(sys, "stdin", io.StringIO(reg.password + "\n"))
        assert main(["pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out"), *args]) == 0
        assert any(s == 307 for _, _, s in proxy.seen)
        assert store.authorizations and all(a is None for a in store.authorizations)
        # ...while the registry itself did get credentials (the push worked).
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()


def test_catalog_and_tags_paginate(registry: Registry, tmp_path: Path) -> None:
    src = _model(tmp_path)

    async def run() -> None:
        opts = ClientOptions(plain_http=True)
        async with RegistryClient(registry.host, opts) as client:
            for name in ("a/one", "a/two", "b/three"):
                await gallery.push(client, src, parse(f"{registry.host}/{name}:v1"))
            for t in ("t1", "t2", "t3", "t4"):
                await gallery.tag(client, parse(f"{registry.host}/a/one:v1"), [t])
            before = client.requests_sent
            repos = await client.catalog(page_size=1)
            assert repos == ["a/one", "a/two", "b/three"]
            assert client.requests_sent - before >= 3  # one page per repository
            tags = await client.list_tags("a/one", page_size=2)
            assert sorted(tags) == ["t1", "t2", "t3", "t4", "v1"]

    trio.run(run)


def test_harbor_projects_api_lists_galleries_without_catalog(registry: Registry, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = _model(tmp_path)
    # Harbor's API in front of the real registry; its catalog is admin-only.
    with HarborAPIStandIn(registry.url, projects={"alpha": True, "beta": True}) as harbor:
        for name in ("alpha/m1", "alpha/llm/base", "beta/m2"):
            assert main(["push", str(src), f"{harbor.host}/{name}:v1", "--plain-http", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["ls", harbor.host, "--plain-http", "--json"]) == 0
        import json

        assert json.loads(capsys.readouterr().out) == [{"gallery": "alpha", "models": 2},
                                                       {"gallery": "beta", "models": 1}]
        assert main(["ls", f"{harbor.host}/alpha", "--plain-http"]) == 0
        out = capsys.readouterr().out
        assert "llm/base" in out and "m1" in out
        assert len(harbor.requests("^GET /api/v2.0/")) >= 3
        assert not harbor.requests("/v2/_catalog")


def test_plain_registry_falls_back_to_catalog(registry: Registry, tmp_path: Path) -> None:
    src = _model(tmp_path)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            await gallery.push(client, src, parse(f"{registry.host}/g/m:v1"))
            assert await client.harbor_repositories() is None
            assert await client.repositories() == ["g/m"]

    trio.run(run)
