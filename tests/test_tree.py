"""Unit tests of the tree model, fed by a fake listing source (no mount, no network)."""

from __future__ import annotations

import logging
import stat

import pytest
import trio

from galleryfs import digest as digests
from galleryfs import modelpack
from galleryfs.errors import NotFound, RegistryUnavailable
from galleryfs.modelpack import Descriptor, Revision
from galleryfs.mount.tree import ROOT_INODE, UNDATED_NS, Kind, Tree

pytestmark = pytest.mark.trio


def _revision(files: dict[str, int], created: str | None = None,
              tar: str | None = None) -> Revision:
    layers = [Descriptor(modelpack.layer_media_type("weight"), digests.of_bytes(p.encode()),
                         size, {modelpack.ANNOTATION_FILEPATH: p})
              for p, size in files.items()]
    if tar:
        layers.append(Descriptor("application/vnd.cncf.model.code.v1.tar",
                                 digests.of_bytes(tar.encode()), 10,
                                 {modelpack.ANNOTATION_FILEPATH: tar}))
    config = Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(b"{}"), 2)
    annotations = {modelpack.ANNOTATION_CREATED: created} if created else None
    body = modelpack.build_manifest(config, layers, annotations)
    return modelpack.parse_manifest(digests.of_bytes(body), body)


class FakeSource:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Revision]] = {}
        self.calls: list[tuple] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise RegistryUnavailable("fake registry is down")

    async def catalog(self) -> list[str]:
        self.calls.append(("catalog",))
        self._check()
        return sorted(self.repos)

    async def tags(self, repo: str) -> list[str]:
        self.calls.append(("tags", repo))
        self._check()
        if repo not in self.repos:
            raise NotFound(repo)
        return sorted(self.repos[repo])

    async def manifest(self, repo: str, reference: str) -> Revision:
        self.calls.append(("manifest", repo, reference))
        self._check()
        for tag, rev in self.repos.get(repo, {}).items():
            if reference in (tag, rev.digest):
                return rev
        raise NotFound(f"{repo}:{reference}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


REV1 = _revision({"config.json": 10, "model.safetensors": 1000, "1_Pooling/config.json": 5},
                 created="2024-05-01T12:00:00Z", tar="src")
REV2 = _revision({"config.json": 11})


def _source() -> FakeSource:
    src = FakeSource()
    src.repos = {
        "g/m": {"latest": REV1, "base": REV2, "v1": REV1},
        "g/m/base": {"latest": REV2},
        "g/deep/er/model": {"latest": REV2},
        "h/x": {"latest": REV2},
    }
    return src


async def _path(tree: Tree, path: str) -> int:
    inode = ROOT_INODE
    for part in [p for p in path.split("/") if p]:
        inode = (await tree.lookup(inode, part)).inode
    return inode


async def _names(tree: Tree, path: str) -> list[str]:
    return [n for n, _ in await tree.listdir(await _path(tree, path))]


async def test_registry_root_lists_galleries_and_nested_models() -> None:
    tree = Tree(_source(), "")
    assert await _names(tree, "") == ["g", "h"]
    assert await _names(tree, "g") == ["deep", "m"]
    assert await _names(tree, "g/deep/er") == ["model"]
    assert await _names(tree, "g/deep/er/model") == sorted([REV2.digest, "latest"])


async def test_collision_nested_model_wins_and_tag_is_hidden(
        caplog: pytest.LogCaptureFixture) -> None:
    tree = Tree(_source(), "")
    with caplog.at_level(logging.WARNING, logger="galleryfs.mount.tree"):
        names = await _names(tree, "g/m")
    # `base` is the nested model g/m/base, not the tag base of g/m.
    assert names == sorted([REV1.digest, REV2.digest, "base", "latest", "v1"])
    base = await tree.lookup(await _path(tree, "g/m"), "base")
    assert base.kind is Kind.NAMESPACE and base.repo == "g/m/base"
    assert await _names(tree, "g/m/base") == sorted([REV2.digest, "latest"])
    assert any("tag 'base' is hidden" in r.getMessage() for r in caplog.records)
    # The hidden tag's revision is still listed under its digest.
    rev = await tree.lookup(await _path(tree, "g/m"), REV2.digest)
    assert rev.kind is Kind.REVISION


async def test_tags_are_symlinks_to_revision_names() -> None:
    tree = Tree(_source(), "")
    latest = await _path(tree, "g/m/latest")
    assert await tree.readlink(latest) == REV1.digest
    attrs = tree.attrs(latest)
    assert stat.S_ISLNK(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o777
    assert attrs.size == len(REV1.digest) and not attrs.immutable


async def test_revision_files_attrs_and_nesting() -> None:
    tree = Tree(_source(), "", mount_time_ns=123)
    rev = await _path(tree, f"g/m/{REV1.digest}")
    assert await _names(tree, f"g/m/{REV1.digest}") == [
        "1_Pooling", "config.json", "model.safetensors", "src"]
    assert await _names(tree, f"g/m/{REV1.digest}/1_Pooling") == ["config.json"]
    f = await _path(tree, f"g/m/{REV1.digest}/model.safetensors")
    a = tree.attrs(f)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o444
    assert a.size == 1000 and a.blocks == 2 and a.immutable
    # created annotation -> mtime (2024-05-01T12:00:00Z)
    assert a.mtime_ns == 1714564800 * 10**9
    d = tree.attrs(rev)
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o555
    assert d.nlink == 3  # ., .., 1_Pooling
    # Without the annotation: a fixed time, the same on every mount (not the mount time).
    other = await _path(tree, f"g/m/{REV2.digest}/config.json")
    assert tree.attrs(other).mtime_ns == UNDATED_NS != 123
    # The tar layer is listed but marked not servable.
    src_file = tree.get(await _path(tree, f"g/m/{REV1.digest}/src"))
    assert src_file.file is not None and not src_file.file.servable


async def test_inodes_are_stable_and_lookups_counted() -> None:
    tree = Tree(_source(), "")
    a = await _path(tree, f"g/m/{REV1.digest}/config.json")
    b = await _path(tree, f"g/m/{REV1.digest}/config.json")
    assert a == b
    assert tree.get(a).lookups == 2
    tree.forget(a, 2)
    assert tree.get(a).lookups == 0
    assert await _path(tree, f"g/m/{REV1.digest}/config.json") == a
    # Same digest in another repository: its own inodes (the parent differs).
    c = await _path(tree, f"g/m/base/{REV2.digest}/config.json")
    d = await _path(tree, f"g/m/{REV2.digest}/config.json")
    assert c != d


async def test_unknown_names_raise_not_found() -> None:
    tree = Tree(_source(), "")
    for path in ("nope", "g/nope", "g/m/nope", f"g/m/{REV1.digest}/nope",
                 "g/m/sha256:" + "0" * 64):
        with pytest.raises(NotFound):
            await _path(tree, path)


async def test_untagged_revision_reachable_by_digest_not_listed() -> None:
    src = _source()
    old = _revision({"old.bin": 3})
    tree = Tree(src, "")
    assert old.digest not in await _names(tree, "g/m")
    src.repos["g/m"]["_untagged"] = old  # stands in for a manifest with no tag
    node = await tree.lookup(await _path(tree, "g/m"), old.digest)
    assert node.kind is Kind.REVISION
    assert await _names(tree, f"g/m/{old.digest}") == ["old.bin"]


async def test_refresh_follows_moved_tag_only_after_ttl() -> None:
    src = _source()
    clock = Clock()
    tree = Tree(src, "", refresh=30, clock=clock)
    latest = await _path(tree, "g/m/latest")
    assert await tree.readlink(latest) == REV1.digest
    src.repos["g/m"]["latest"] = REV2
    clock.now += 10
    assert await tree.readlink(latest) == REV1.digest  # still within the TTL
    clock.now += 25
    assert await tree.readlink(latest) == REV2.digest
    assert await _path(tree, "g/m/latest") == latest  # same inode, new target


async def test_folder_mtime_moves_only_when_its_listing_changes() -> None:
    src = _source()
    clock = Clock()
    tree = Tree(src, "", refresh=30, clock=clock)
    model = await _path(tree, "g/m")
    await _names(tree, "g/m")
    first = tree.attrs(model).mtime_ns
    assert tree.fresh_for(model) == 30
    clock.now += 20
    assert tree.fresh_for(model) == 10
    calls = len(src.calls)
    await tree.revalidate(model)  # still fresh: no request
    assert len(src.calls) == calls
    clock.now += 15
    assert tree.fresh_for(model) == 0
    await tree.revalidate(model)  # stale, re-read, unchanged: same mtime
    assert len(src.calls) > calls and tree.fresh_for(model) == 30
    assert tree.attrs(model).mtime_ns == first
    src.repos["g/m"]["next"] = REV2
    clock.now += 31
    await tree.revalidate(model)
    assert tree.attrs(model).mtime_ns > first
    assert "next" in await _names(tree, "g/m")
    # A folder never listed has nothing cached anywhere: nothing to revalidate.
    calls = len(src.calls)
    await tree.revalidate(await _path(tree, "g/deep"))
    assert len(src.calls) == calls


async def test_a_listing_read_in_parts_keeps_its_offsets() -> None:
    src = _source()
    clock = Clock()
    tree = Tree(src, "", refresh=30, clock=clock)
    model = await _path(tree, "g/m")
    first = await tree.listdir(model)
    src.repos["g/m"]["next"] = REV2
    clock.now += 31
    assert await tree.listdir(model, refresh=False) == first
    assert await tree.listdir(model) != first


async def test_refresh_failure_keeps_old_listing() -> None:
    src = _source()
    clock = Clock()
    tree = Tree(src, "", refresh=1, clock=clock)
    before = await _names(tree, "g/m")
    src.down = True
    clock.now += 5
    assert await _names(tree, "g/m") == before
    fresh = Tree(src, "", refresh=1, clock=clock)
    with pytest.raises(RegistryUnavailable):
        await _names(fresh, "g")


async def test_gallery_root_filters_catalog() -> None:
    tree = Tree(_source(), "g")
    await tree.check()
    assert await _names(tree, "") == ["deep", "m"]
    with pytest.raises(NotFound):
        await _path(tree, "h")
    with pytest.raises(NotFound):
        await Tree(_source(), "zz").check()


async def test_model_root_needs_no_catalog() -> None:
    src = _source()
    tree = Tree(src, "g/m")
    await tree.check()
    names = await _names(tree, "")
    assert ("catalog",) not in src.calls
    # No catalog: no nested models, so the tag `base` shows as a tag here.
    assert names == sorted([REV1.digest, REV2.digest, "base", "latest", "v1"])
    assert tree.get(await _path(tree, "base")).kind is Kind.TAG
    with pytest.raises(NotFound):
        await Tree(_source(), "g/absent").check()


async def test_concurrent_listings_share_one_fetch() -> None:
    src = _source()
    tree = Tree(src, "g/m")
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(tree.listdir, ROOT_INODE)
    assert src.calls.count(("tags", "g/m")) == 1


async def test_listing_a_folder_lists_its_child_folders_in_the_background() -> None:
    src = _source()
    tree = Tree(src, clock=Clock())
    async with trio.open_nursery() as nursery:
        tree.spawn = nursery
        assert await _names(tree, "g") == ["deep", "m"]
    # The nursery waited for the background listings: g/m's tags are resolved already.
    assert tree.prefetched_listings == 2  # g/deep (from the catalog alone) and g/m
    assert ("tags", "g/m") in src.calls
    before = list(src.calls)
    tree.spawn = None
    names = await _names(tree, "g/m")
    assert "latest" in names and REV1.digest in names
    assert src.calls == before  # served from the background listing


async def test_background_listing_failures_stay_in_the_background() -> None:
    src = _source()
    tree = Tree(src, clock=Clock())
    await _names(tree, "g")  # no spawn: nothing in the background
    assert ("tags", "g/m") not in src.calls
    src.down = True
    async with trio.open_nursery() as nursery:
        tree.spawn = nursery
        assert await _names(tree, "g") == ["deep", "m"]  # the catalog listing is still fresh
    with pytest.raises(RegistryUnavailable):
        await _names(tree, "g/m")  # the foreground reports what the background swallowed
