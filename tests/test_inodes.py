"""The inode table's lifetime and bound (`forget`, `--max-inodes`), and a daemon killed
under a reader.

The pure tests drive `Tree` and `Operations` without a kernel: a `FakeKernel` keeps the
references a kernel would (one per lookup, one per readdirplus entry), lets go of a
folder's entries when asked to (`invalidate_entry`) and sends the forgets back. The
mount tests do the same through a real kernel and a real registry.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pyfuse3
import pytest
import trio
import trio.testing

from galleryfs import digest as digests
from galleryfs import modelpack
from galleryfs.mount.operations import XATTR_STATS, Operations
from galleryfs.mount.tree import ROOT_INODE, Kind, Tree
from tests.mounting import fuse_available
from tests.registry_harness import Registry
from tests.test_mount import push_weights, start_foreground, unmount, wait_for_mount
from tests.test_tree import REV1, REV2, Clock, FakeSource, _path, _revision

CTX = pyfuse3.RequestContext()


# ---- a kernel's references, without a kernel -----------------------------------------------


class FakeKernel:
    """What the kernel holds of a mount: a reference count per inode and the names it
    reached them by. `invalidate` drops an entry with everything below it that no open
    file uses, and queues the forgets, as d_invalidate then inode eviction do."""

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.names: dict[tuple[int, str], int] = {}
        self.open: set[int] = set()
        self.forgets: list[tuple[int, int]] = []
        self.ops: Operations | None = None

    def took(self, parent: int, name: str, inode: int) -> None:
        self.refs[inode] = self.refs.get(inode, 0) + 1
        self.names[(parent, name)] = inode

    def invalidate(self, parent: int, name: bytes) -> None:
        inode = self.names.get((parent, os.fsdecode(name)))
        if inode is not None:
            self._let_go(parent, os.fsdecode(name), inode)

    def _let_go(self, parent: int, name: str, inode: int) -> bool:
        below = [(n, i) for (p, n), i in list(self.names.items()) if p == inode]
        kept = [self._let_go(inode, n, i) for n, i in below]
        if inode in self.open or any(kept):
            return True
        del self.names[(parent, name)]
        self.forgets.append((inode, self.refs.pop(inode)))
        return False

    async def deliver(self) -> None:
        assert self.ops is not None
        while self.forgets:
            batch, self.forgets = self.forgets, []
            await self.ops.forget(batch)


class Token:
    def __init__(self) -> None:
        self.entries: list[tuple[str, pyfuse3.EntryAttributes]] = []

    def reply(self, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        self.entries.append((os.fsdecode(name), attr))
        return True


@pytest.fixture(autouse=True)
def _readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attr, next_id: token.reply(name, attr, next_id))


def _gallery(models: int, tags: int = 3) -> FakeSource:
    """`models` models, each with `tags` tags on as many revisions of two files."""
    revisions = [_revision({"config.json": 10 + i, "w/model.bin": 100 + i})
                 for i in range(tags)]
    src = FakeSource()
    src.repos = {f"g/m{n:04d}": {f"v{i}": revisions[i] for i in range(tags)}
                 for n in range(models)}
    return src


def _ops(tree: Tree, kernel: FakeKernel) -> Operations:
    reader: Any = SimpleNamespace(chunk_size=4096, snapshot=dict,
                                  open=lambda blob, nursery: SimpleNamespace(close=lambda: None))
    ops = Operations(tree, reader, invalidate_entry=kernel.invalidate)
    kernel.ops = ops
    return ops


async def _ls_r(ops: Operations, kernel: FakeKernel, inode: int = ROOT_INODE,
                prefix: str = "") -> dict[str, int]:
    """`ls -R` as the kernel does it: readdirplus, each entry referenced; forgets come
    back as the daemon asks for them (after each request, as /dev/fuse interleaves)."""
    seen: dict[str, int] = {}
    token = Token()
    await ops.readdir(inode, 0, token)  # type: ignore[arg-type]
    await kernel.deliver()
    for name, attr in token.entries:
        kernel.took(inode, name, attr.st_ino)
        seen[prefix + name] = attr.st_ino
    for name, attr in token.entries:
        if attr.st_mode & 0o170000 == 0o040000:
            seen.update(await _ls_r(ops, kernel, attr.st_ino, f"{prefix}{name}/"))
    return seen


def _assert_held_are_known(tree: Tree, kernel: FakeKernel) -> None:
    """The daemon never dropped an inode the kernel holds."""
    for inode, refs in kernel.refs.items():
        assert tree.get(inode).lookups == refs


# ---- forget and the bound, without a kernel ------------------------------------------------


@pytest.mark.trio
async def test_listing_twice_stays_under_the_bound_with_stable_numbers() -> None:
    clock = Clock()
    tree = Tree(_gallery(300), "", refresh=1.0, clock=clock, max_inodes=1000)
    kernel = FakeKernel()
    ops = _ops(tree, kernel)
    first = await _ls_r(ops, kernel)
    # 300 models x (a folder, 3 tags, 3 revisions of 2 files and a subfolder)
    assert len(first) == 1 + 300 * 16
    assert tree.inode_count <= tree.max_inodes
    assert tree.inodes_peak <= tree.max_inodes + 30  # one listing past the bound at most
    _assert_held_are_known(tree, kernel)
    clock.now += 5  # every listing is stale: the second pass reads them all again
    second = await _ls_r(ops, kernel)
    assert second == first  # a name keeps its inode number across drops and rebuilds
    assert tree.inode_count <= tree.max_inodes
    assert ops.stats()["inodes"] == tree.inode_count
    assert tree.inodes_dropped > 2 * 300 * 15 - tree.max_inodes
    _assert_held_are_known(tree, kernel)


@pytest.mark.trio
async def test_held_and_open_inodes_stay_until_forgotten_and_closed() -> None:
    tree = Tree(_gallery(50), "", max_inodes=20)
    f = await _path(tree, f"g/m0001/{REV_OF_V0}/config.json")  # one lookup per step
    tree.opened(f)
    for inode, node in list(tree._nodes.items()):
        tree.forget(inode, node.lookups)
    g = await _path(tree, "g")
    tree.forget(g, 1)
    assert tree.trim() == [(g, "m0001")]  # the kernel holds the open file, below m0001
    assert tree.get(f).kind is Kind.FILE  # open: kept, with the folders above it
    assert tree.display_path(f) == f"/g/m0001/{REV_OF_V0}/config.json"
    tree.closed(f)
    tree.trim()
    with pytest.raises(Exception, match="unknown"):
        tree.get(f)
    assert tree.inode_count <= 20
    again = await _path(tree, f"g/m0001/{REV_OF_V0}/config.json")
    assert again == f  # built again: the same number


REV_OF_V0 = _gallery(1).repos["g/m0000"]["v0"].digest


@pytest.mark.trio
async def test_what_the_kernel_holds_is_asked_for_not_dropped() -> None:
    tree = Tree(_gallery(40), "", max_inodes=100)
    kernel = FakeKernel()
    ops = _ops(tree, kernel)
    asked: list[tuple[int, bytes]] = []
    ops._invalidate_entry = lambda p, n: asked.append((p, n))  # a kernel that keeps all
    await _ls_r(ops, kernel)
    _assert_held_are_known(tree, kernel)
    assert tree.inode_count > 100  # it cannot go below what is held
    g = await _path(tree, "g")
    # The least recently used models are asked for; the galleries stay pinned.
    assert asked and all(p == g for p, _ in asked)
    assert asked[0] == (g, b"m0000")
    # Asked once, not at each request, while the kernel keeps it.
    assert len(asked) == len(set(asked))


@pytest.mark.trio
async def test_a_moved_tag_leaves_no_orphan_once_forgotten() -> None:
    src = _gallery(1, tags=1)
    clock = Clock()
    tree = Tree(src, "", refresh=1.0, clock=clock, max_inodes=3)
    kernel = FakeKernel()
    ops = _ops(tree, kernel)
    ops._invalidate_entry = lambda p, n: None
    old = await _path(tree, f"g/m0000/{REV_OF_V0}/config.json")
    src.repos["g/m0000"] = {"v0": REV2}
    clock.now += 5
    model = await _path(tree, "g/m0000")
    assert [n for n, _ in await tree.listdir(model)] == sorted(["v0", REV2.digest])
    tree.trim()
    assert tree.get(old).lookups == 1  # the kernel still holds the old revision's file
    for inode, node in list(tree._nodes.items()):
        tree.forget(inode, node.lookups)
    tree.trim()
    with pytest.raises(Exception, match="unknown"):
        tree.get(old)
    assert all(n.digest != REV_OF_V0 for n in tree._nodes.values())
    assert REV_OF_V0 not in tree._revisions  # its manifest went with it


@pytest.mark.trio
async def test_a_dropped_listing_moves_the_mtime_only_if_it_changed() -> None:
    src = FakeSource()
    src.repos = {"g/m": {"v1": REV1}}
    clock = Clock()
    tree = Tree(src, "", refresh=1.0, clock=clock, max_inodes=2, mount_time_ns=1)
    model = await _path(tree, "g/m")
    await tree.listdir(model)
    before = tree.attrs(model).mtime_ns
    tree.trim()  # nothing below the model is held: its listing goes
    assert tree._namespaces[model].listing is None
    await tree.listdir(model)
    assert tree.attrs(model).mtime_ns == before  # the kernel's cached listing still holds
    tree.trim()
    src.repos["g/m"]["v2"] = REV2
    await tree.listdir(model)
    assert tree.attrs(model).mtime_ns > before  # it does not: the kernel reads it again


@pytest.mark.trio
async def test_a_number_taken_by_another_key_is_not_given_again() -> None:
    tree = Tree(FakeSource(), "")
    key = ("tag", "g/m", "v1")
    inode = tree._number(key)
    assert tree._number(key) == inode  # the same each time
    tree._nodes[inode] = tree._nodes[ROOT_INODE]  # as if another key held it
    other = tree._number(key)
    assert other not in (inode, ROOT_INODE) and other > 0 and other < 2 ** 63


# ---- a real mount: a gallery of 2,000 models x 3 tags --------------------------------------

MODELS = 2000
FILES = 8  # a revision's files (one blob): 62,000 names in all
MOUNT_MAX_INODES = 4000
# Measured here: the daemon starts at about 35 MiB (44 before it loaded `cryptography`
# only to check signatures). Walking the gallery twice took it to 50-57 MiB with
# --max-inodes 4000 (growth 19-21 MiB: a walk's peak passes the bound, and malloc keeps
# what that peak took); without a bound (--max-inodes 100000000) it held all 62,002
# names after each walk, at 75-78 MiB (growth 40-42 MiB, about 0.6 KiB a name). The
# bound sits between the two.
RSS_GROWTH = 30 << 20
RSS_BOUND = 100 << 20


def build_gallery(registry: Registry, models: int, gallery: str = "big") -> None:
    """`models` models of three tags each, on three revisions of FILES tiny files.

    The first model goes through the registry API; the others are copies of its
    repository folder in the registry's storage (links to the same blobs and manifests,
    as blob mounts and manifest PUTs would write them): through the API, 2,000 models
    took 82 s on a busy 2-core machine, the copies take seconds.
    """
    config = b'{"descriptor": {}, "config": {}, "modelfs": {"type": "layers", "diffIds": []}}'
    layer = b"tiny weights\n"
    manifests = [modelpack.build_manifest(
        modelpack.Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(config), len(config)),
        [modelpack.Descriptor(modelpack.layer_media_type("weight"), digests.of_bytes(layer),
                              len(layer), {modelpack.ANNOTATION_FILEPATH: f"part-{k}.bin"})
         for k in range(FILES)],
        {modelpack.ANNOTATION_CREATED: f"2026-01-0{i + 1}T00:00:00Z"}) for i in range(3)]
    first = f"{gallery}/m0000"
    with httpx.Client(base_url=registry.url, timeout=30) as http:
        for body in (config, layer):
            r = http.post(f"/v2/{first}/blobs/uploads/")
            sep = "&" if "?" in r.headers["location"] else "?"
            r = http.put(f"{r.headers['location']}{sep}digest={digests.of_bytes(body)}",
                         content=body)
            assert r.status_code == 201, r.text
        for i, body in enumerate(manifests):
            r = http.put(f"/v2/{first}/manifests/v{i}", content=body,
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            assert r.status_code == 201, r.text
        repos = registry.storage_dir / "docker" / "registry" / "v2" / "repositories"
        for n in range(1, models):
            shutil.copytree(repos / first, repos / f"{gallery}/m{n:04d}", copy_function=os.link)
        last = f"{gallery}/m{models - 1:04d}"
        assert sorted(http.get(f"/v2/{last}/tags/list").json()["tags"]) == ["v0", "v1", "v2"]
        r = http.get(f"/v2/{last}/manifests/v2",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 200 and r.content == manifests[2]


def _stats(mnt: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mnt, XATTR_STATS))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def _settled(mnt: Path, bound: int, timeout: float = 30.0) -> dict[str, Any]:
    """The stats once the trims that follow a walk have run (the kernel's forgets come
    back asynchronously), or as they are when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = _stats(mnt)
        if got["inodes"] <= bound or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _walk(top: Path) -> tuple[list[tuple[int, int]], list[OSError]]:
    """(folders, files) of each folder below `top`, walked as eight readers would: one
    `os.walk` after another takes minutes (four registry requests a model, one model
    after another, on a busy machine)."""
    errors: list[OSError] = []

    def one(path: Path) -> list[tuple[int, int]]:
        return [(len(d), len(f)) for _, d, f in os.walk(path, onerror=errors.append)]

    models = sorted(top.iterdir())
    with ThreadPoolExecutor(8) as pool:
        found = [(len(models), 0)] + [c for part in pool.map(one, models) for c in part]
    return found, errors


@pytest.mark.mount
@pytest.mark.timeout(600)
@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")
def test_a_big_gallery_listed_twice_keeps_the_daemon_bounded(registry: Registry,
                                                             tmp_path: Path) -> None:
    started = time.monotonic()
    build_gallery(registry, MODELS)
    assert time.monotonic() - started < 60
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, tmp_path / "cache", log, "--refresh", "1",
                            "--max-inodes", str(MOUNT_MAX_INODES))
    try:
        wait_for_mount(proc, mnt, log)
        rss_before = _rss(proc.pid)
        for walk in (1, 2):
            found, errors = _walk(mnt / "big")
            assert not errors
            # A model: 3 revision folders and 3 tags (links to folders); FILES a revision.
            assert sum(d for d, _ in found) == MODELS * 7
            assert sum(f for _, f in found) == MODELS * 3 * FILES
            got = _settled(mnt, MOUNT_MAX_INODES)
            rss = _rss(proc.pid)
            print(f"walk {walk}: {got['inodes']} inodes (peak {got['inodes_peak']}, "
                  f"{got['inodes_dropped']} dropped, {got['inode_invalidations']} asked), "
                  f"RSS {rss_before >> 20} -> {rss >> 20} MiB")
            assert got["inodes"] <= MOUNT_MAX_INODES
            assert rss - rss_before <= RSS_GROWTH and rss <= RSS_BOUND
            time.sleep(1.1)  # past --refresh: the second walk lists everything again
        # Background trims run at most every 0.5 s, and what the kernel still holds goes
        # only with its forgets: a fast walk overshoots (4,908-8,062 seen at 4,000), far
        # below the 62,000 names an unbounded table holds.
        assert got["inodes_peak"] <= 3 * MOUNT_MAX_INODES
        names = MODELS * (1 + 3 + 3 * (1 + FILES))
        assert got["inodes_dropped"] > 2 * names - 2 * MOUNT_MAX_INODES  # both walks'
        assert got["inode_invalidations"] > 0  # the kernel was asked to let go
    finally:
        unmount(mnt, proc)


# ---- a daemon killed under a reader ---------------------------------------------------------

# Maps a file, reads its first page, waits; then touches its last page, never read.
MMAP_READER = """
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
assert m[:4096] == open(sys.argv[2], "rb").read(4096)
print("mapped", flush=True)
sys.stdin.readline()
m[len(m) - 1]
print("read after the kill", flush=True)
"""


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")
def test_a_killed_daemon_gives_mmap_readers_sigbus_and_the_next_mount_recovers(
        registry: Registry, tmp_path: Path) -> None:
    # Far larger than the kernel's read-around of a page fault (read_ahead_kb, 1 MiB).
    data = push_weights(registry, tmp_path, "g/m:v1", 16 << 20)
    expected = tmp_path / "expected.bin"
    expected.write_bytes(data)
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    path = mnt / "g" / "m" / "v1" / "weights.bin"
    proc = start_foreground(registry.host, mnt, tmp_path / "cache", log)
    reader = None
    try:
        wait_for_mount(proc, mnt, log)
        reader = subprocess.Popen([sys.executable, "-c", MMAP_READER, str(path), str(expected)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline() == "mapped\n"
        proc.kill()  # SIGKILL: no unmount, no goodbye
        proc.wait(timeout=10)
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.wait(timeout=30) == -signal.SIGBUS
        assert reader.stdout.read() == ""
        # The next mount on the same path clears the dead one and serves again.
        again = subprocess.run(
            [sys.executable, "-m", "galleryfs", "mount", registry.host, str(mnt),
             "--plain-http", "--cache-dir", str(tmp_path / "cache"), "--timeout", "5"],
            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
        assert again.returncode == 0, again.stderr
        assert "cleaning up after a galleryfs that died" in again.stderr
        assert path.read_bytes() == data
        done = subprocess.run([sys.executable, "-m", "galleryfs", "unmount", str(mnt)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mnt)
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
        unmount(mnt, proc)


def test_max_inodes_is_checked_and_reaches_the_daemon_child() -> None:
    from galleryfs.errors import UsageError
    from galleryfs.mount.config import MountConfig
    from galleryfs.registry.client import ClientOptions

    def config(**changes: Any) -> MountConfig:
        return MountConfig("registry.example:5000/team", "mnt", ClientOptions(), "cache",
                           **changes)

    assert config().max_inodes == 100_000
    assert MountConfig.from_json(config(max_inodes=5000).to_json()).max_inodes == 5000
    with pytest.raises(UsageError, match="--max-inodes must be at least 1000"):
        config(max_inodes=10)
    bad = subprocess.run([sys.executable, "-m", "galleryfs", "mount", "127.0.0.1:1/g", "/nonexistent",
                          "--max-inodes", "5"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--max-inodes must be at least 1000" in bad.stderr


@pytest.mark.trio
async def test_trims_run_in_the_background_at_most_every_interval(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    from galleryfs.mount import operations

    tree = Tree(_gallery(30), "", max_inodes=50)
    kernel = FakeKernel()
    ops = _ops(tree, kernel)
    trims: list[float] = []
    real_trim = tree.trim

    def counted() -> list[tuple[int, str]]:
        trims.append(trio.current_time())
        return real_trim()

    monkeypatch.setattr(tree, "trim", counted)
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        await _ls_r(ops, kernel)  # hundreds of requests over the bound, none waits on a trim
        assert len(trims) == 1
        for _ in range(20):  # each trim asks, the forgets come, the next trim drops
            await trio.sleep(operations.TRIM_INTERVAL)
            await kernel.deliver()
        assert all(b - a >= operations.TRIM_INTERVAL for a, b in itertools.pairwise(trims))
        assert 2 <= len(trims) <= 21
        assert tree.inode_count <= tree.max_inodes
        nursery.cancel_scope.cancel()
