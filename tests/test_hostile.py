"""Hostile manifests and tags (issue 13): a revision of 20,000 layers, tags a real registry
would not store, file names no file system takes. What is hostile is left out with one
warning; the rest of the gallery lists, pulls and mounts, and nothing stalls."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from galleryfs import digest as digests
from galleryfs import modelpack
from galleryfs.errors import RegistryError, UnsupportedContent
from galleryfs.reference import valid_tag
from tests.hostile_registry import HostileRegistry
from tests.mounting import fuse_available
from tests.registry_harness import Registry
from tests.test_mount import start_foreground, unmount, wait_for_mount

D1 = "sha256:" + "1" * 64
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
HOSTILE_TAGS = ["bad\x00tag", "a/b", "sha256:" + "2" * 64, "x" * 129, "-dash", ".dot",
                "latest\n", "sp ace", "", 7, None]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def galleryfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "galleryfs", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def warnings_of(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "WARNING" in ln]


def layer(path: str, blob: dict, media: str = WEIGHT) -> dict:
    return {"mediaType": media, **blob, "annotations": {modelpack.ANNOTATION_FILEPATH: path}}


def manifest_json(config: dict, layers: list[dict]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": modelpack.OCI_MANIFEST,
                       "artifactType": modelpack.ARTIFACT_TYPE,
                       "config": {"mediaType": modelpack.CONFIG_TYPE, **config},
                       "layers": layers}, separators=(",", ":")).encode()


# ---- the real registry, fed raw -----------------------------------------------------


def put_blob(http: httpx.Client, repo: str, data: bytes) -> dict:
    d = digests.of_bytes(data)
    r = http.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    r = http.put(location + ("&" if "?" in location else "?") + f"digest={d}", content=data,
                 headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return {"digest": d, "size": len(data)}


def put_manifest(http: httpx.Client, repo: str, tag: str, body: bytes) -> str:
    r = http.put(f"/v2/{repo}/manifests/{tag}", content=body,
                 headers={"Content-Type": modelpack.OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return r.headers["docker-content-digest"]


def push_small(http: httpx.Client, repo: str) -> tuple[str, bytes]:
    """A one-file revision tagged `latest`: its digest and its file's bytes."""
    data = b"small model\n"
    body = manifest_json(put_blob(http, repo, b"{}"), [layer("config.json", put_blob(http, repo, data))])
    return put_manifest(http, repo, "latest", body), data


# ---- 1. a manifest of 20,000 layers -------------------------------------------------


def many_layers(n: int, blob: dict, name: str = "f") -> list[dict]:
    return [layer(f"{name}{i}.bin", blob) for i in range(n)]


def test_more_layers_than_the_cap_are_refused() -> None:
    over = manifest_json({"digest": D1, "size": 2},
                         many_layers(modelpack.MAX_LAYERS + 1, {"digest": D1, "size": 1}))
    with pytest.raises(UnsupportedContent, match=f"more than .* \\({modelpack.MAX_LAYERS}\\)"):
        modelpack.parse_manifest("sha256:x", over)
    at_cap = manifest_json({"digest": D1, "size": 2},
                           many_layers(modelpack.MAX_LAYERS, {"digest": D1, "size": 1}))
    assert len(modelpack.parse_manifest("sha256:x", at_cap).files) == modelpack.MAX_LAYERS


def test_layers_left_out_are_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    # A manifest of thousands of unusable layers must not write thousands of log lines
    # (at every refresh of a mount).
    layers = [layer("../escape", {"digest": D1, "size": 1})] * 3000
    with caplog.at_level(logging.WARNING, logger="galleryfs.modelpack"):
        revision = modelpack.parse_manifest("sha256:x", manifest_json({"digest": D1, "size": 2},
                                                                      layers))
    assert len(revision.skipped) == 3000 and not revision.files
    assert len(caplog.records) == 1 and "3000 layer(s) left out" in caplog.text


@pytest.fixture
def big_gallery(registry: Registry) -> Iterator[tuple[Registry, str, str, bytes]]:
    """`g/big:latest`, a 20,000-layer manifest the registry accepted, and `g/small`."""
    with httpx.Client(base_url=registry.url, timeout=60) as http:
        blob = put_blob(http, "g/big", b"x")
        body = manifest_json(put_blob(http, "g/big", b"{}"), many_layers(20_000, blob))
        assert 3 << 20 < len(body) < 4 << 20  # under the client's 4 MiB manifest cap
        big = put_manifest(http, "g/big", "latest", body)
        _, small_data = push_small(http, "g/small")
    yield registry, big, "g/small", small_data


def test_inspect_refuses_a_huge_manifest_quickly(big_gallery: tuple[Registry, str, str, bytes]
                                                 ) -> None:
    registry, big, _, _ = big_gallery
    started = time.monotonic()
    # Before the fix this took ~99 s of CPU (each path compared with every other one).
    result = galleryfs("inspect", "--plain-http", f"{registry.host}/g/big:latest", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout[:500]
    assert elapsed < 10, elapsed
    assert "Traceback" not in result.stderr
    assert "20000 layers" in result.stderr and str(modelpack.MAX_LAYERS) in result.stderr
    # `ls` still lists the model's revisions: this one as unreadable (no files), warned once.
    listed = galleryfs("ls", "--plain-http", "--json", f"{registry.host}/g/big", timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["digest"], r["files"]) for r in rows] == [(big, 0)]
    assert len([w for w in warnings_of(listed.stderr) if "20000 layers" in w]) == 1


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")
def test_mount_stays_responsive_beside_a_huge_manifest(
        big_gallery: tuple[Registry, str, str, bytes], tmp_path: Path) -> None:
    registry, big, small_repo, small_data = big_gallery
    mnt, log = tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, tmp_path / "cache", log, "--refresh", "1")
    try:
        wait_for_mount(proc, mnt, log)
        # Listing the gallery starts listing both models in the background: the big one's
        # manifest is fetched and checked while the small model's file is read.
        assert sorted(os.listdir(mnt / "g")) == ["big", "small"]
        listed: list[list[str]] = []
        lister = threading.Thread(target=lambda: listed.append(os.listdir(mnt / "g" / "big")))
        started = time.monotonic()
        lister.start()
        assert (mnt / small_repo / "latest" / "config.json").read_bytes() == small_data
        read_in = time.monotonic() - started
        lister.join(timeout=30)
        listed_in = time.monotonic() - started
        assert not lister.is_alive(), "listing the huge model hangs"
        assert read_in < 5, read_in
        assert listed_in < 10, listed_in
        assert listed == [[]]  # its only tag names a revision that is refused
        # The listings go stale (--refresh 1) and are read again: no new warning.
        time.sleep(1.5)  # not a synchronisation: the listing must age past --refresh
        assert os.listdir(mnt / "g" / "big") == []
        assert (mnt / small_repo / "latest" / "config.json").read_bytes() == small_data
    finally:
        unmount(mnt, proc)
    text = log.read_text()
    assert "Traceback" not in text
    refused = [ln for ln in text.splitlines() if "20000 layers" in ln]
    assert len(refused) == 1, refused


# ---- 2. hostile tags ----------------------------------------------------------------


def test_hostile_tags_are_left_out_of_a_listing(caplog: pytest.LogCaptureFixture) -> None:
    from galleryfs.registry import listings  # new with the fix

    body = json.dumps({"name": "g/m", "tags": ["good", *HOSTILE_TAGS]}).encode()
    with caplog.at_level(logging.WARNING):
        page = listings.page(body, "reg/g/m")
        assert listings.page_names(page, "tags", valid_tag, "reg/g/m") == ["good"]
    assert len(caplog.records) == 1 and f"{len(HOSTILE_TAGS)} skipped" in caplog.text
    # The same bad tags again (a mount's next refresh): warned about once.
    warned: set[str] = set()
    caplog.clear()
    for _ in range(3):
        listings.page_names(page, "tags", valid_tag, "reg/g/m", warned)
    assert len(caplog.records) == 1
    with pytest.raises(RegistryError, match="not a list"):
        listings.page_names({"tags": "latest"}, "tags", valid_tag, "reg/g/m")
    with pytest.raises(RegistryError, match="not JSON"):
        listings.page(b"[" * 100_000, "reg/g/m")


def test_tag_grammar_is_matched_whole() -> None:
    assert valid_tag("v1.0_rc-2") and valid_tag("_x") and valid_tag("a" * 128)
    # `$` matches before a final newline: `^...$` let these through.
    for bad in ("latest\n", "a" * 128 + "\n"):
        assert not valid_tag(bad)
    assert not digests.is_digest("sha256:" + "a" * 63 + "\n")


@pytest.fixture
def hostile_gallery() -> Iterator[tuple[HostileRegistry, str, bytes]]:
    """`g/m` tagged `good` and with every hostile tag (all naming one revision); hostile
    repository names beside it in the catalog."""
    with HostileRegistry() as reg:
        data = b"weights\n"
        body = manifest_json({**reg.blob(b"{}")}, [layer("w.bin", reg.blob(data))])
        digest = reg.manifest("g/m", body, "good", *HOSTILE_TAGS)
        for bad_repo in ("g/bad\x00repo", "g/../x", "G/Upper", "g/sp ace"):
            reg.manifest(bad_repo, body, "good")
        yield reg, digest, data


def test_ls_lists_a_model_with_hostile_tags(hostile_gallery: tuple[HostileRegistry, str, bytes]
                                           ) -> None:
    reg, digest, _ = hostile_gallery
    # Before: a traceback (httpx.InvalidURL for the NUL tag).
    result = galleryfs("ls", "--plain-http", "--json", f"{reg.host}/g/m")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert [(r["digest"], r["tags"]) for r in json.loads(result.stdout)] == [(digest, ["good"])]
    assert len(warnings_of(result.stderr)) == 1, result.stderr
    assert f"{len(HOSTILE_TAGS)} skipped" in result.stderr
    # The catalog's hostile repository names are left out, the rest lists.
    models = galleryfs("ls", "--plain-http", "--json", f"{reg.host}/g")
    assert models.returncode == 0, models.stderr
    assert [r["model"] for r in json.loads(models.stdout)] == ["m"]
    assert len(warnings_of(models.stderr)) == 1, models.stderr


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")
def test_mount_lists_a_model_with_hostile_tags(
        hostile_gallery: tuple[HostileRegistry, str, bytes], tmp_path: Path) -> None:
    reg, digest, data = hostile_gallery
    mnt, log = tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    proc = start_foreground(reg.host, mnt, tmp_path / "cache", log)
    try:
        wait_for_mount(proc, mnt, log)
        assert os.listdir(mnt) == ["g"]
        assert os.listdir(mnt / "g") == ["m"]
        # Before: EIO for the whole folder (tag `a/b`), or a dead mount (the NUL tag).
        assert sorted(os.listdir(mnt / "g" / "m")) == sorted(["good", digest])
        assert os.readlink(mnt / "g" / "m" / "good") == digest
        assert (mnt / "g" / "m" / "good" / "w.bin").read_bytes() == data
    finally:
        unmount(mnt, proc)
    text = log.read_text()
    assert "Traceback" not in text
    warned = [ln for ln in text.splitlines() if "skipped (not valid names)" in ln]
    assert len([ln for ln in warned if "tags" in ln]) == 1, text
    # Once by the check before the mount serves (on the terminal of `galleryfs mount`),
    # once by the mount.
    assert len([ln for ln in warned if "repositories" in ln]) == 2, text


def test_push_and_copy_refuse_a_tag_shaped_like_an_accessory(registry: Registry,
                                                             tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}\n")
    shaped = "sha256-" + "a" * 64 + ".sig"
    pushed = galleryfs("push", "--plain-http", "--quiet", str(src),
                       f"{registry.host}/g/m:{shaped}")
    assert pushed.returncode == 2, pushed.stdout + pushed.stderr
    assert "kept for signatures" in pushed.stderr and "Traceback" not in pushed.stderr
    ok = galleryfs("push", "--plain-http", "--quiet", str(src), f"{registry.host}/g/m:v1")
    assert ok.returncode == 0, ok.stderr
    copied = galleryfs("cp", "--plain-http", "--quiet", f"{registry.host}/g/m:v1",
                       f"{registry.host}/g/m2:sha256-{'b' * 64}.att")
    assert copied.returncode == 2, copied.stdout + copied.stderr
    assert "kept for signatures" in copied.stderr
    with httpx.Client(base_url=registry.url, timeout=30) as http:
        assert http.get("/v2/g/m/tags/list").json()["tags"] == ["v1"]
        assert http.get("/v2/g/m2/tags/list").status_code == 404


def test_push_refuses_more_files_than_a_revision_holds(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from galleryfs.cli import main

    monkeypatch.setattr(modelpack, "MAX_LAYERS", 3)
    src = tmp_path / "model"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.json").write_text("{}\n")
    assert main(["push", "--plain-http", "--quiet", str(src), f"{registry.host}/g/m:v1"]) == 2
    with httpx.Client(base_url=registry.url, timeout=30) as http:
        assert http.get("/v2/g/m/tags/list").status_code == 404


# ---- 3. file names no file system takes ----------------------------------------------


def test_file_names_a_file_system_cannot_hold_are_left_out() -> None:
    blob = {"digest": D1, "size": 1}
    body = manifest_json({"digest": D1, "size": 2}, [
        layer("good.bin", blob), layer("bad\ud800name", blob), layer("n" * 256, blob),
        layer("d/" + "é" * 128, blob), layer("é" * 127 + "a", blob), layer("n" * 255, blob)])
    revision = modelpack.parse_manifest("sha256:x", body)
    assert sorted(f.path for f in revision.files) == sorted(["good.bin", "é" * 127 + "a",
                                                             "n" * 255])
    assert len(revision.skipped) == 3
    assert "not valid UTF-8" in revision.skipped[0] and "256 bytes" in revision.skipped[1]


@pytest.fixture
def hostile_paths(registry: Registry) -> Iterator[tuple[Registry, str, bytes]]:
    """`g/paths:latest` in the real registry: a good file beside a lone surrogate
    (`"bad\\ud800name"` in the JSON) and a 300-byte name."""
    with httpx.Client(base_url=registry.url, timeout=30) as http:
        data = b"good bytes\n"
        good = put_blob(http, "g/paths", data)
        body = manifest_json(put_blob(http, "g/paths", b"{}"), [
            layer("good.txt", good), layer("bad\ud800name", good), layer("n" * 300, good),
            layer("sub/" + "m" * 256 + "/x", good)])
        assert b"bad\\ud800name" in body
        digest = put_manifest(http, "g/paths", "latest", body)
    yield registry, digest, data


def test_pull_leaves_out_names_no_file_system_takes(
        hostile_paths: tuple[Registry, str, bytes], tmp_path: Path) -> None:
    registry, _, data = hostile_paths
    dest = tmp_path / "out"
    # Before: a traceback (UnicodeEncodeError) for the surrogate.
    result = galleryfs("pull", "--plain-http", "--quiet", f"{registry.host}/g/paths:latest",
                       str(dest))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(dest) == ["good.txt"] and (dest / "good.txt").read_bytes() == data
    warned = warnings_of(result.stderr)
    assert len(warned) == 1 and "3 layer(s) left out" in warned[0], result.stderr


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")
def test_mount_leaves_out_names_no_file_system_takes(
        hostile_paths: tuple[Registry, str, bytes], tmp_path: Path) -> None:
    registry, digest, data = hostile_paths
    mnt, log = tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    proc = start_foreground(f"{registry.host}/g/paths", mnt, tmp_path / "cache", log)
    try:
        wait_for_mount(proc, mnt, log)
        # Before: EIO for the revision folder (the surrogate cannot be encoded).
        assert os.listdir(mnt / digest) == ["good.txt"]
        assert (mnt / "latest" / "good.txt").read_bytes() == data
        assert all(len(n.encode()) <= os.statvfs(mnt).f_namemax
                   for _, dirs, files in os.walk(mnt) for n in dirs + files)
    finally:
        unmount(mnt, proc)
    assert "Traceback" not in log.read_text()
