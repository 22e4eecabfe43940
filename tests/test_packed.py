"""Packed (tar) layers: KitOps ModelKits, ModelPack tar layers (modctl without --raw), ORAS
folders. Each is built from its tool's spec (tests/packed_artifacts.py) or by the tool
(oras-py), pushed to a real registry, and must mount and pull byte for byte; hostile tar
metadata is skipped, never followed."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from galleryfs import modelpack, tarindex
from tests import packed_artifacts as packed
from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry

STATS = "user.galleryfs.stats"
UNSUPPORTED = "user.galleryfs.unsupported"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "1_Pooling" / "empty").mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["BertModel"]}')
    (root / "model.safetensors").write_bytes(os.urandom((3 << 20) + 123))
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (root / "README.md").write_text("# test model\n")
    return root


def tree_of(root: Path) -> dict[str, bytes | None]:
    """Every path under root: a file's bytes, None for a folder."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def expected(root: Path, *paths: str) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for rel in paths:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = None
        p = root / rel
        out[rel] = None if p.is_dir() else p.read_bytes()
        if p.is_dir():
            for sub in p.rglob("*"):
                out[sub.relative_to(root).as_posix()] = None if sub.is_dir() else sub.read_bytes()
    return out


def pull(registry: Registry, ref: str, dest: Path, env: dict[str, str]) -> str:
    result = galleryfs("pull", "--plain-http", f"{registry.host}/{ref}", str(dest), env=env)
    assert result.returncode == 0, result.stderr
    return result.stderr


def mount_tree(registry: Registry, repo: str, tag: str, tmp_path: Path,
               *options: str) -> dict[str, bytes | None]:
    env = isolated_env(tmp_path)
    with mounted(f"{registry.host}/{repo}", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache"), *options) as mnt:
        return tree_of(mnt / tag)


# ---- the three packagings, mounted and pulled -----------------------------------------


def test_kitops_modelkit_mounts_and_pulls_byte_identical(registry: Registry, tmp_path: Path,
                                                         source: Path) -> None:
    packed.push_modelkit(registry.host, "g/kit", "v1", source, model="model.safetensors",
                         code="1_Pooling", docs="README.md")
    want = expected(source, "model.safetensors", "1_Pooling", "README.md")
    assert "1_Pooling/empty" in want  # an empty folder of the tar shows as a folder
    env = isolated_env(tmp_path)
    pull(registry, "g/kit:v1", tmp_path / "out", env)
    assert tree_of(tmp_path / "out") == want
    assert mount_tree(registry, "g/kit", "v1", tmp_path) == want


@pytest.mark.parametrize("packing", ["tar", "gzip", "zstd"])
def test_modelpack_tar_layers_mount_and_pull_byte_identical(
        registry: Registry, tmp_path: Path, source: Path, packing: str) -> None:
    files = {"config.json": "weight.config", "model.safetensors": "weight",
             "1_Pooling/config.json": "weight.config", "README.md": "doc"}
    packed.push_modelpack(registry.host, "g/mp", "v1", source, files, packing)
    want = expected(source, *files)
    env = isolated_env(tmp_path)
    pull(registry, "g/mp:v1", tmp_path / "out", env)
    assert tree_of(tmp_path / "out") == want
    assert mount_tree(registry, "g/mp", "v1", tmp_path) == want


def test_oras_folder_mounts_as_a_folder_and_pulls(registry: Registry, tmp_path: Path,
                                                  source: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import oras.client

    monkeypatch.chdir(source)  # oras-py pushes only paths below the working folder
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    client.push(target=f"{registry.host}/g/oras:v1", files=["1_Pooling", "config.json"])
    shown = galleryfs("inspect", "--plain-http", f"{registry.host}/g/oras:v1",
                      env=isolated_env(tmp_path))
    assert shown.returncode == 0, shown.stderr
    # What oras-py wrote: the folder as one tar+gzip layer named by its title (oras-py,
    # unlike the oras CLI, does not add `io.deis.oras.content.unpack`).
    (folder,) = [layer for layer in json.loads(shown.stdout)["manifest"]["layers"]
                 if layer["annotations"][modelpack.ANNOTATION_TITLE] == "1_Pooling"]
    assert folder["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    files = {f["path"]: f for f in json.loads(shown.stdout)["files"]}
    assert files["1_Pooling"]["packed"] == "gzip" and "unsupported" not in files["1_Pooling"]
    want = expected(source, "1_Pooling", "config.json")
    env = isolated_env(tmp_path)
    pull(registry, "g/oras:v1", tmp_path / "out", env)
    assert tree_of(tmp_path / "out") == want
    got = mount_tree(registry, "g/oras", "v1", tmp_path)
    assert got == want and got["1_Pooling"] is None  # a folder, not a file


# ---- lazy reads ------------------------------------------------------------------------


def test_a_member_of_a_large_tar_is_read_without_the_rest(registry: Registry,
                                                          tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "a.bin").write_bytes(os.urandom(24 << 20))
    small = os.urandom((2 << 20) + 77)
    (root / "blobs" / "b.bin").write_bytes(small)
    (root / "blobs" / "c.bin").write_bytes(os.urandom(24 << 20))
    tar = packed.tar_of(root, ["blobs"])
    packed.push_raw(registry.host, "g/lazy", "v1",
                    (packed.MODELPACK_CONFIG, packed.modelpack_config([packed.digest(tar)])),
                    [("application/vnd.cncf.model.weight.v1.tar", tar,
                      {packed.FILEPATH: "blobs"})], artifact_type=packed.MODELPACK_ARTIFACT)
    env = isolated_env(tmp_path)
    chunk = 1 << 20
    # No disk cache (nothing written behind), unverified (no whole-blob check first).
    with mounted(f"{registry.host}/g/lazy", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache"), "--cache-size", "0",
                 "--verify", "end", "--chunk-size", "1M") as mnt:
        before = json.loads(os.getxattr(mnt, STATS))["registry_bytes"]
        assert sorted(os.listdir(mnt / "v1" / "blobs")) == ["a.bin", "b.bin", "c.bin"]
        assert os.path.getsize(mnt / "v1" / "blobs" / "a.bin") == 24 << 20
        assert (mnt / "v1" / "blobs" / "b.bin").read_bytes() == small
        spent = json.loads(os.getxattr(mnt, STATS))["registry_bytes"] - before
    # The member, and the chunks holding the four headers (the manifest is a few KB).
    assert spent <= len(small) + 4 * chunk, spent
    assert spent < len(tar) // 8


# ---- hostile tars ----------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
         link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile_tar(fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        _add(tar, "pkg", kind=tarfile.DIRTYPE)
        _add(tar, "pkg/good.txt", b"good")
        _add(tar, "../x", b"escaped")
        _add(tar, "/abs", b"absolute")
        _add(tar, "pkg/pw", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "pkg/up", kind=tarfile.SYMTYPE, link="../../x")
        _add(tar, "pkg/ok", kind=tarfile.SYMTYPE, link="good.txt")
        _add(tar, "pkg/hl", kind=tarfile.LNKTYPE, link="../outside")
        _add(tar, "pkg/same", kind=tarfile.LNKTYPE, link="pkg/good.txt")
        _add(tar, "pkg/dev", kind=tarfile.CHRTYPE)
        _add(tar, "pkg/fifo", kind=tarfile.FIFOTYPE)
        _add(tar, "pkg/" + "n" * 300, b"long name")
        _add(tar, "pkg/" + "d" * 120 + "/" + "e" * 120, b"long path, short names")
        _add(tar, "pkg/back\\slash", b"backslash")
        _add(tar, "pkg/last.bin", os.urandom(64 << 10))
    data = buf.getvalue()
    # Cut inside the last member: its data runs past the end of the layer.
    return data[:data.rindex(b"pkg/last.bin") + 512 + 1000]


HOSTILE_SHOWN = {"pkg": None, "pkg/good.txt": b"good", "pkg/ok": b"good", "pkg/same": b"good",
                 "pkg/" + "d" * 120: None,
                 "pkg/" + "d" * 120 + "/" + "e" * 120: b"long path, short names"}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_hostile_members_are_skipped_with_a_warning(fmt: int, caplog: pytest.LogCaptureFixture
                                                    ) -> None:
    data = hostile_tar(fmt)
    listing = tarindex.index(lambda off, n: data[off:off + n], len(data))
    layer = modelpack.RevisionFile("sha256-x", "sha256:" + "0" * 64, len(data),
                                   "application/vnd.kitops.modelkit.code.v1.tar", False,
                                   packing=modelpack.TAR)
    revision = modelpack.Revision("sha256:" + "1" * 64, {}, (layer,), ())
    with caplog.at_level("WARNING"):
        files = tarindex.expand(revision, {layer.digest: listing}).files
    got = {f.path: None if f.member and f.member.folder else
           data[f.member.offset:f.member.offset + f.size] for f in files if f.member}
    # (the folder of the long path is no member: mount and pull make it for its file)
    assert got == {k: v for k, v in HOSTILE_SHOWN.items() if k != "pkg/" + "d" * 120}
    said = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("'../x'", "'/abs'", "'pkg/pw'", "'pkg/up'", "'pkg/hl'", "'pkg/dev'",
                 "'pkg/fifo'", "'pkg/nnn", "back\\\\slash", "'pkg/last.bin'",
                 "beyond the end"):
        assert name in said, name


def test_listing_reads_headers_not_data() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            _add(tar, f"f{i}", os.urandom(1 << 20))
    data = buf.getvalue()
    asked: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        asked.append((off, n))
        return data[off:off + n]

    listing = tarindex.index(read, len(data))
    assert [m.name for m in listing.members] == ["f0", "f1", "f2"]
    assert sum(n for _, n in asked) == listing.header_bytes < 8 * 512


def test_sparse_files_are_not_served_as_their_map() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("GNUSparseFile.0/w.bin")
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "w.bin", "GNU.sparse.realsize": "4096"}
        info.size = 1024
        tar.addfile(info, io.BytesIO(b"1\n0\n512\n" + bytes(1016)))
        _add(tar, "after.txt", b"after")
    data = buf.getvalue()
    listing = tarindex.index(lambda off, n: data[off:off + n], len(data))
    assert [m.name for m in listing.members] == ["after.txt"]
    assert "sparse" in listing.warnings[0]


def test_member_cap_stops_the_listing() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(10):
            _add(tar, f"f{i}", b"x")
    data = buf.getvalue()
    listing = tarindex.index(lambda off, n: data[off:off + n], len(data), max_members=4)
    assert len(listing.members) == 4 and "more than 4 members" in listing.warnings[-1]


def _push_hostile(registry: Registry) -> None:
    tar = hostile_tar()
    # A KitOps layer: no path annotation, members placed from the revision root.
    packed.push_raw(registry.host, "g/evil", "v1",
                    (packed.KITOPS_CONFIG, b'{"manifestVersion": "1.0.0"}'),
                    [("application/vnd.kitops.modelkit.code.v1.tar", tar, {}),
                     ("application/vnd.kitops.modelkit.docs.v1.tar+gzip",
                      packed.compress(tar, "gzip"), {})])


def test_hostile_tar_pull_writes_only_what_is_safe(registry: Registry, tmp_path: Path) -> None:
    _push_hostile(registry)
    env = isolated_env(tmp_path)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    out = tmp_path / "deep" / "er" / "out"
    said = pull(registry, "g/evil:v1", out, env)
    # Both layers hold the same members: the second's all clash with the first's.
    assert tree_of(out) == HOSTILE_SHOWN
    assert not (tmp_path / "deep" / "x").exists() and not (tmp_path / "x").exists()
    assert sorted(os.listdir(tmp_path / "deep" / "er")) == ["out"]  # nothing left behind
    assert "'pkg/pw'" in said and "leaves the revision" in said


def test_hostile_tar_mount_shows_only_what_is_safe(registry: Registry, tmp_path: Path) -> None:
    _push_hostile(registry)
    assert mount_tree(registry, "g/evil", "v1", tmp_path) == HOSTILE_SHOWN


# ---- no disk cache: compressed layers stay refused, with the reason ---------------------


def test_compressed_layer_without_a_disk_cache_is_refused_with_a_reason(
        registry: Registry, tmp_path: Path, source: Path) -> None:
    packed.push_modelpack(registry.host, "g/nc", "v1", source,
                          {"config.json": "weight.config"}, "gzip")
    env = isolated_env(tmp_path)
    with mounted(f"{registry.host}/g/nc", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache"), "--cache-size", "0") as mnt:
        f = mnt / "v1" / "config.json"
        assert "--cache-size is 0" in os.getxattr(f, UNSUPPORTED).decode()
        with pytest.raises(OSError) as raised:
            f.read_bytes()
        assert raised.value.errno == errno.EOPNOTSUPP


# ---- the disk cache's write-behind, for members ------------------------------------------


@pytest.mark.trio
async def test_write_behind_takes_a_members_chunks_from_its_page_cache(
        registry: Registry, tmp_path: Path) -> None:
    # A member's file holds a range of the layer blob: the write-behind asks the kernel
    # for the chunks wholly inside it at the member's offsets; a chunk it shares with a
    # header or another member (in no one file's pages) is not cached, nor fetched again.
    import trio

    from galleryfs.mount.writeback import PageCacheFill
    from tests.test_chunks import CHUNK, Counting, PageCache, _client, push_blob, tabled

    data = os.urandom(10 * CHUNK + 1234)
    ref = tabled("packed/blob", push_blob(registry.url, "packed/blob", data), data)
    base, end = 2 * CHUNK + 100, 6 * CHUNK + 50  # chunks 2 and 6 are shared
    async with _client(registry) as client, trio.open_nursery() as nursery:
        from galleryfs.mount.diskcache import DiskCache
        from galleryfs.mount.reader import ChunkReader

        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, memory_bytes=CHUNK,
                             disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        kernel = PageCache(nursery)
        fill = PageCacheFill(reader, kernel.retrieve, quiet=3600)
        kernel.fill = fill
        reader.defer = fill.owe
        await nursery.start(fill.run)
        fill.opened(ref, 7, base, end - base)
        kernel.files[7] = data[base:end]
        for index in range(2, 7):
            got = await reader.read(ref, index * CHUNK, CHUNK)
            assert got == data[index * CHUNK:(index + 1) * CHUNK]
        # Reads pause.
        fill.quiet = 0
        fill._wake.set()
        with trio.fail_after(30):
            await fill.drained()
        nursery.cancel_scope.cancel()
    # 3, 4, 5 from the member's pages; 6 from memory (the last read); 2 not cached.
    assert fill.stats.filled == 4 and fill.stats.from_memory == 1
    assert fill.stats.dropped == 1 and kernel.served == 3 * CHUNK
    assert len(fetch.calls) == 5  # each chunk read once, none fetched for the cache


# ---- compressed layers that cannot be unpacked -----------------------------------------


def _push_single(registry: Registry, repo: str, media: str, blob: bytes, path: str) -> None:
    packed.push_raw(registry.host, repo, "v1",
                    (packed.MODELPACK_CONFIG, packed.modelpack_config([packed.digest(blob)])),
                    [(media, blob, {packed.FILEPATH: path})],
                    artifact_type=packed.MODELPACK_ARTIFACT)


def test_a_damaged_compressed_layer_is_refused_with_the_reason(registry: Registry,
                                                               tmp_path: Path) -> None:
    # Its digest is right (the registry checked it): the layer itself is not gzip.
    _push_single(registry, "g/bad", "application/vnd.cncf.model.doc.v1.tar+gzip",
                 b"not gzip at all " * 100, "docs")
    env = isolated_env(tmp_path)
    with mounted(f"{registry.host}/g/bad", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache")) as mnt:
        f = mnt / "v1" / "docs"
        assert "damaged gzip stream" in os.getxattr(f, UNSUPPORTED).decode()
        with pytest.raises(OSError) as raised:
            f.read_bytes()
        assert raised.value.errno == errno.EOPNOTSUPP
    result = galleryfs("pull", "--plain-http", f"{registry.host}/g/bad:v1",
                       str(tmp_path / "out"), env=env)
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert "damaged gzip stream" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_compressed_layer_larger_than_the_cache_is_not_unpacked(registry: Registry,
                                                                  tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "zeros.bin").write_bytes(bytes(8 << 20))  # 8 MiB that zstd makes a few KB
    tar = packed.tar_of(root, ["zeros.bin"])
    _push_single(registry, "g/bomb", "application/vnd.cncf.model.weight.v1.tar+zstd",
                 packed.compress(tar, "zstd"), "zeros.bin")
    env = isolated_env(tmp_path)
    with mounted(f"{registry.host}/g/bomb", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache"), "--cache-size", "4M",
                 "--chunk-size", "1M") as mnt:
        assert "unpacks to more than" in os.getxattr(mnt / "v1" / "zeros.bin",
                                                     UNSUPPORTED).decode()


def test_compressed_layers_together_unpack_to_at_most_the_cache_size(registry: Registry,
                                                                      tmp_path: Path) -> None:
    # Each layer alone fits --cache-size; together they would not. Unnamed files live as
    # long as the mount: without a bound for all, a revision of many layers (or `ls -R`)
    # fills the disk.
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.bin").write_bytes(bytes(3 << 20))
    (root / "b.bin").write_bytes(b"\x01" * (3 << 20))
    layers = [("application/vnd.cncf.model.weight.v1.tar+zstd",
               packed.compress(packed.tar_of(root, [name]), "zstd"), {packed.FILEPATH: name})
              for name in ("a.bin", "b.bin")]
    packed.push_raw(registry.host, "g/two", "v1",
                    (packed.MODELPACK_CONFIG,
                     packed.modelpack_config([packed.digest(b) for _, b, _ in layers])),
                    layers, artifact_type=packed.MODELPACK_ARTIFACT)
    env = isolated_env(tmp_path)
    with mounted(f"{registry.host}/g/two", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache"), "--cache-size", "4M",
                 "--chunk-size", "1M") as mnt:
        assert (mnt / "v1" / "a.bin").read_bytes() == bytes(3 << 20)
        assert "more than --cache-size" in os.getxattr(mnt / "v1" / "b.bin",
                                                       UNSUPPORTED).decode()
        assert json.loads(os.getxattr(mnt, STATS))["unpacked_bytes"] <= 4 << 20


# ---- the tree, with members in a packed layer's place -----------------------------------


@pytest.mark.trio
async def test_tree_shows_members_in_the_layers_place_and_empty_folders() -> None:
    from galleryfs.mount.tree import Kind, Tree
    from tests.test_tree import REV1, _names, _path, _source

    calls: list[str] = []

    async def unpack(repo: str, revision: modelpack.Revision) -> modelpack.Revision:
        calls.append(repo)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            _add(tar, "src", kind=tarfile.DIRTYPE)
            _add(tar, "src/empty", kind=tarfile.DIRTYPE)
            _add(tar, "src/main.py", b"print()")
            _add(tar, "config.json", b"{}")  # outside the layer's folder
        data = buf.getvalue()
        listing = tarindex.index(lambda off, n: data[off:off + n], len(data))
        return tarindex.expand(revision, {f.digest: listing for f in revision.files
                                          if f.packing})

    tree = Tree(_source(), "", unpack=unpack)
    rev = f"g/m/{REV1.digest}"
    assert await _names(tree, rev) == ["1_Pooling", "config.json", "model.safetensors", "src"]
    assert await _names(tree, f"{rev}/src") == ["empty", "main.py"]
    assert await _names(tree, f"{rev}/src/empty") == []
    assert tree.get(await _path(tree, f"{rev}/src")).kind is Kind.FOLDER
    main = tree.get(await _path(tree, f"{rev}/src/main.py"))
    assert main.kind is Kind.FILE and main.file is not None and main.file.size == 7
    assert tree.get(await _path(tree, f"{rev}/config.json")).file.size == 10  # the layer's
    assert calls == ["g/m"]  # once per revision folder


def test_warnings_of_a_layer_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(50):
            _add(tar, f"../bad{i}", b"x")
    data = buf.getvalue()
    listing = tarindex.index(lambda off, n: data[off:off + n], len(data))
    layer = modelpack.RevisionFile("sha256-x", "sha256:" + "0" * 64, len(data),
                                   "application/vnd.kitops.modelkit.code.v1.tar", False,
                                   packing=modelpack.TAR)
    with caplog.at_level("WARNING"):
        tarindex.expand(modelpack.Revision("sha256:" + "1" * 64, {}, (layer,), ()),
                        {layer.digest: listing})
    assert len(caplog.records) == tarindex.MAX_WARNINGS + 1
    assert "30 more members skipped" in caplog.records[-1].getMessage()


# ---- a registry that lies about a compressed layer ---------------------------------------


@pytest.mark.trio
async def test_a_compressed_layer_the_registry_damages_is_not_unpacked_then_is(
        registry: Registry, tmp_path: Path, source: Path) -> None:
    from galleryfs.mount.packed import PackedLayers
    from galleryfs.mount.reader import ChunkReader
    from tests.test_chunks import Counting, _client

    packed.push_modelpack(registry.host, "g/lie", "v1", source,
                          {"model.safetensors": "weight"}, "gzip")
    async with _client(registry) as client:
        m = await client.get_manifest("g/lie", "v1")
        revision = modelpack.parse_manifest(m.digest, m.body, m.media_type)
        fetch = Counting(client)  # the real registry's bytes, with a flipped first byte
        layers = PackedLayers(ChunkReader(fetch, chunk_size=1 << 20),
                              spill_dir=str(tmp_path), spill_limit=1 << 30)
        fetch.corrupt = True
        # The layer alone is refused (the revision's other files would still show)...
        (bad,) = (await layers.expand("g/lie", revision)).files
        assert bad.member is None and not bad.servable and "failed its check" in bad.reason
        fetch.corrupt = False  # ...the registry's fault, not the layer's: tried again
        (f,) = (await layers.expand("g/lie", revision)).files
        assert f.path == "model.safetensors" and f.member is not None
        handle = layers.open("g/lie", f, f.path, None)
        want = (source / "model.safetensors").read_bytes()
        assert await handle.read(0, len(want) + 10) == want
        layers.close()


def test_an_unpacked_chunk_changed_on_disk_is_not_served(tmp_path: Path) -> None:
    import hashlib

    from galleryfs.errors import DigestMismatch
    from galleryfs.mount.packed import LocalTar

    data = os.urandom(3000)
    fd = os.open(tmp_path / "t", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, data, 0)
    tar = LocalTar(fd, len(data), 1024, [hashlib.sha256(data[i:i + 1024]).digest()
                                         for i in range(0, len(data), 1024)])
    assert tar.read(1000, 1000) == data[1000:2000]  # chunks 0 and 1
    os.pwrite(fd, b"\x00" if data[2100] else b"\x01", 2100)  # chunk 2
    assert tar.read(0, 2048) == data[:2048]
    with pytest.raises(DigestMismatch):
        tar.read(2048, 10)
    tar.close()


def test_a_damaged_tar_layer_fails_alone_not_its_revision(registry: Registry,
                                                          tmp_path: Path) -> None:
    from tests.test_integrity import blob_file, flip

    root = tmp_path / "src"
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "w.bin").write_bytes(os.urandom(300_000))
    (root / "README.md").write_text("read me\n")
    tar = packed.tar_of(root, ["weights/w.bin"])
    plain = (root / "README.md").read_bytes()
    packed.push_raw(registry.host, "g/m", "v1",
                    (packed.MODELPACK_CONFIG, packed.modelpack_config([packed.digest(tar)])),
                    [("application/vnd.cncf.model.weight.v1.tar", tar,
                      {packed.FILEPATH: "weights/w.bin"}),
                     ("application/vnd.cncf.model.doc.v1.raw", plain,
                      {packed.FILEPATH: "README.md"})],
                    artifact_type=packed.MODELPACK_ARTIFACT)
    flip(blob_file(registry, tar), (len(tar) // 2,))  # inside the member's data
    env = isolated_env(tmp_path)
    with mounted(f"{registry.host}/g/m", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "cache")) as mnt:
        rev = mnt / "v1"
        assert sorted(p.name for p in rev.iterdir()) == ["README.md", "weights"]
        assert (rev / "README.md").read_bytes() == plain  # the rest of the revision reads
        layer = rev / "weights" / "w.bin"
        assert "failed its check" in os.getxattr(layer, UNSUPPORTED).decode()
        with pytest.raises(OSError) as raised:
            layer.read_bytes()
        assert raised.value.errno == errno.EOPNOTSUPP
