"""The FUSE operations called directly, without a kernel mount (as S3QL's t3_fs_api.py).

A real `Tree` over a real registry (`RegistrySource`) and a real `ChunkReader`; only the
kernel is missing. `pyfuse3.readdir_reply` needs a token only libfuse can make, so
readdir is handed a `Token` of our own and the reply function is swapped for one that
appends to it. The real-mount tests (test_mount.py) cover the same ground through the
kernel; these say which operation gives which answer, and what it logs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyfuse3
import pytest
import trio

from galleryfs import digest as digests
from galleryfs import errors, gallery, modelpack
from galleryfs.errors import (
    AuthError,
    DigestMismatch,
    GalleryError,
    InvalidReference,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    TooLarge,
    UnsupportedContent,
    UsageError,
)
from galleryfs.gallery.locations import BlobLocations
from galleryfs.mount.operations import (
    IMMUTABLE_TIMEOUT,
    XATTR_DIGEST,
    XATTR_FLUSH,
    XATTR_MEDIATYPE,
    XATTR_STATS,
    XATTR_UNSUPPORTED,
    NotServable,
    Operations,
    ReadOnly,
    errno_for,
    fuse_errors,
)
from galleryfs.mount.reader import ChunkReader
from galleryfs.mount.sources import RegistrySource
from galleryfs.mount.tree import ROOT_INODE, Tree
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.ranges import DirectRanges
from galleryfs.registry.retry import RetryPolicy
from tests.registry_harness import Registry, free_port

CHUNK = 64 << 10
GALLERY = "opsapi"  # this module's own gallery in the session's shared registry
REPO = f"{GALLERY}/model"
CTX = pyfuse3.RequestContext()
FILES = {
    "config.json": b'{"model_type": "ops"}',
    "weights.bin": os.urandom(3 * CHUNK + 1234),
    "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
}


# ---- the registry side: real pushes ------------------------------------------------------


def _options(**kw: Any) -> ClientOptions:
    return ClientOptions(plain_http=True, timeout=10, **kw)


async def push(registry: Registry, files: dict[str, bytes], ref: str, where: Path,
               also: tuple[str, ...] = ()) -> str:
    """Push `files` as a model revision tagged `ref` (and the tags `also`); its digest."""
    src = where / "model"
    for path, data in files.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    async with RegistryClient(registry.host, _options()) as client:
        full = parse(f"{registry.host}/{ref}")
        result = await gallery.push(client, src, full,
                                    locations=BlobLocations(where / "locations.json"))
        if also:
            await gallery.tag(client, full, list(also))
        return result.digest


@dataclass(frozen=True)
class Pushed:
    host: str
    digest: str  # the revision tagged v1 and latest


@pytest.fixture(scope="module")
def pushed(registry_session: Registry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    where = tmp_path_factory.mktemp("ops")
    digest = trio.run(lambda: push(registry_session, FILES, f"{REPO}:v1", where, ("latest",)))
    return Pushed(registry_session.host, digest)


# ---- the mount side: operations without a kernel -----------------------------------------


@dataclass
class Fs:
    ops: Operations
    tree: Tree
    reader: ChunkReader
    client: RegistryClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def operations(host: str, root: str = "", retry: RetryPolicy | None = None,
                     clock: Clock | None = None) -> AsyncIterator[Fs]:
    """What `galleryfs mount` builds (daemon._serve), minus pyfuse3.init and main."""
    async with RegistryClient(host, _options(retry=retry)) as client:
        ranges = DirectRanges(client)
        try:
            tree = Tree(RegistrySource(client), root, clock=clock or Clock())
            reader = ChunkReader(ranges, chunk_size=CHUNK, memory_bytes=16 * CHUNK,
                                 span_fetch=ranges.span)
            ops = Operations(tree, reader,
                             counters=lambda: {"registry_bytes": client.bytes_received})
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                tree.spawn = nursery
                yield Fs(ops, tree, reader, client)
                nursery.cancel_scope.cancel()  # prefetches of files left open
        finally:
            ranges.close()


@pytest.fixture
async def fs(pushed: Pushed) -> AsyncIterator[Fs]:
    async with operations(pushed.host) as made:
        yield made


class Token:
    """Stands in for libfuse's readdir buffer: room for `room` entries, then full."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.entries: list[tuple[str, pyfuse3.EntryAttributes, int]] = []

    def reply(self, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(self.entries) >= self.room:
            return False  # as libfuse: the entry was not taken, the kernel asks again
        self.entries.append((os.fsdecode(name), attr, next_id))
        return True


@pytest.fixture(autouse=True)
def _readdir_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attr, next_id: token.reply(name, attr, next_id))


async def readdir(ops: Operations, inode: int, start: int = 0, room: int = 1000
                  ) -> list[tuple[str, pyfuse3.EntryAttributes, int]]:
    token = Token(room)
    # Kernel listings: readdir is told the folder's inode, no opendir came before it.
    await ops.readdir(inode, start, token)  # type: ignore[arg-type]
    return token.entries


async def names(ops: Operations, inode: int) -> list[str]:
    return [name for name, _, _ in await readdir(ops, inode)]


async def walk(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    inode = ROOT_INODE
    entry = await ops.getattr(inode, CTX)
    for part in path.split("/"):
        entry = await ops.lookup(inode, os.fsencode(part), CTX)
        inode = entry.st_ino
    return entry


async def open_files(ops: Operations) -> int:
    return int(json.loads(await ops.getxattr(ROOT_INODE, XATTR_STATS, CTX))["open_files"])


async def errno_of(call: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="galleryfs")
    yield caplog


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- names and attributes ------------------------------------------------------------------


@pytest.mark.trio
async def test_lookup_and_getattr_of_every_kind(fs: Fs, pushed: Pushed) -> None:
    ops = fs.ops
    root = await ops.getattr(ROOT_INODE, CTX)
    assert root.st_ino == ROOT_INODE
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
    assert (root.st_uid, root.st_gid) == (os.getuid(), os.getgid())

    for path in (GALLERY, REPO):
        folder = await walk(ops, path)
        assert stat.S_ISDIR(folder.st_mode), path
        # A namespace's attributes expire with its listing (tags move).
        assert 0 < folder.entry_timeout <= fs.tree.refresh
        assert folder.attr_timeout == folder.entry_timeout

    tag = await walk(ops, f"{REPO}/v1")
    assert stat.S_ISLNK(tag.st_mode)
    assert tag.st_size == len(pushed.digest)
    assert await ops.readlink(tag.st_ino, CTX) == pushed.digest.encode()
    assert await ops.readlink((await walk(ops, f"{REPO}/latest")).st_ino, CTX) \
        == pushed.digest.encode()

    rev = await walk(ops, f"{REPO}/{pushed.digest}")
    assert stat.S_ISDIR(rev.st_mode)
    assert rev.entry_timeout == rev.attr_timeout == IMMUTABLE_TIMEOUT

    data = FILES["weights.bin"]
    f = await walk(ops, f"{REPO}/{pushed.digest}/weights.bin")
    assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o444
    assert f.st_size == len(data)
    assert f.st_blocks == math.ceil(len(data) / 512)  # so `du` adds up to the size
    assert f.st_blksize == fs.reader.chunk_size
    assert f.entry_timeout == IMMUTABLE_TIMEOUT
    again = await ops.getattr(f.st_ino, CTX)
    assert (again.st_ino, again.st_size, again.st_mtime_ns) == (f.st_ino, f.st_size, f.st_mtime_ns)

    nested = await walk(ops, f"{REPO}/{pushed.digest}/tokenizer/vocab.txt")
    assert stat.S_ISREG(nested.st_mode) and nested.st_size == len(FILES["tokenizer/vocab.txt"])
    # Once its contents are known: ".", the entry in its parent, and tokenizer/'s "..".
    assert (await ops.getattr(rev.st_ino, CTX)).st_nlink == 3


@pytest.mark.trio
async def test_lookups_are_counted_and_forgotten(fs: Fs, pushed: Pushed) -> None:
    path = f"{REPO}/{pushed.digest}/config.json"
    first = await walk(fs.ops, path)
    second = await walk(fs.ops, path)
    assert first.st_ino == second.st_ino  # a name keeps its inode
    assert fs.tree.get(first.st_ino).lookups == 2
    await fs.ops.forget([(first.st_ino, 2)])
    assert fs.tree.get(first.st_ino).lookups == 0


@pytest.mark.trio
async def test_unknown_names_are_enoent_and_logged_at_debug(
        fs: Fs, pushed: Pushed, debug_logs: pytest.LogCaptureFixture) -> None:
    ops = fs.ops
    model = (await walk(ops, REPO)).st_ino
    rev = (await walk(ops, f"{REPO}/{pushed.digest}")).st_ino
    weights = (await walk(ops, f"{REPO}/{pushed.digest}/weights.bin")).st_ino
    calls = {
        "gallery": ops.lookup(ROOT_INODE, b"no-such-gallery", CTX),
        "tag": ops.lookup(model, b"v9", CTX),
        "revision": ops.lookup(model, f"sha256:{'0' * 64}".encode(), CTX),
        "file": ops.lookup(rev, b"missing.bin", CTX),
        "dot-dot": ops.lookup(rev, b"..", CTX),
        "below a file": ops.lookup(weights, b"x", CTX),
        "inode": ops.getattr(10**9, CTX),
        "xattrs of an inode": ops.listxattr(10**9, CTX),
    }
    debug_logs.clear()
    for what, call in calls.items():
        assert await errno_of(call) == errno.ENOENT, what
    # Misses are what `ls` and loaders probing for files do all day: debug, not warnings.
    assert not warnings(debug_logs)
    ops_debug = [r for r in debug_logs.records if r.name == "galleryfs.mount.operations"]
    assert len(ops_debug) == len(calls)


# ---- listings ------------------------------------------------------------------------------


@pytest.mark.trio
async def test_opendir_is_declined_so_the_kernel_keeps_listings(fs: Fs) -> None:
    assert await errno_of(fs.ops.opendir(ROOT_INODE, CTX)) == errno.ENOSYS


@pytest.mark.trio
async def test_readdir_lists_every_level(fs: Fs, pushed: Pushed) -> None:
    ops = fs.ops
    assert GALLERY in await names(ops, ROOT_INODE)
    assert await names(ops, (await walk(ops, GALLERY)).st_ino) == ["model"]
    model = (await walk(ops, REPO)).st_ino
    # Both tags point at one revision: it is listed once.
    assert await names(ops, model) == sorted([pushed.digest, "latest", "v1"])
    rev = (await walk(ops, f"{REPO}/{pushed.digest}")).st_ino
    entries = await readdir(ops, rev)
    assert [n for n, _, _ in entries] == ["config.json", "tokenizer", "weights.bin"]
    attrs = {n: a for n, a, _ in entries}
    assert attrs["weights.bin"].st_size == len(FILES["weights.bin"])
    assert stat.S_ISDIR(attrs["tokenizer"].st_mode)
    assert await names(ops, attrs["tokenizer"].st_ino) == ["vocab.txt"]


@pytest.mark.trio
async def test_readdir_resumes_at_its_offsets(fs: Fs, pushed: Pushed) -> None:
    """A listing read a few entries per request (a full buffer) has no gaps or repeats,
    and only the entries the kernel took count as lookups."""
    ops = fs.ops
    rev = (await walk(ops, f"{REPO}/{pushed.digest}")).st_ino
    whole = await readdir(ops, rev)
    before = {n: fs.tree.get(a.st_ino).lookups for n, a, _ in whole}
    got: list[str] = []
    start = 0
    while True:
        part = await readdir(ops, rev, start, room=1)
        if not part:
            break
        got += [n for n, _, _ in part]
        start = part[-1][2]
    assert got == [n for n, _, _ in whole]
    assert [next_id for _, _, next_id in whole] == list(range(1, len(whole) + 1))
    for name, attr, _ in whole:
        assert fs.tree.get(attr.st_ino).lookups == before[name] + 1, name
    assert json.loads(await ops.getxattr(ROOT_INODE, XATTR_STATS, CTX))["readdir_requests"] \
        == 1 + len(whole) + 1  # the whole listing, one per entry, the empty end


@pytest.mark.trio
async def test_a_listing_read_in_pieces_is_not_refreshed_midway(
        registry_session: Registry, tmp_path: Path) -> None:
    """Only a pass starting at offset 0 refreshes a stale listing: a tag that appears
    while the kernel reads a folder in several requests cannot shift the offsets (and
    make it skip or repeat a name); the next pass shows it."""
    repo = f"{GALLERY}-moving/m"
    digest = await push(registry_session, {"config.json": b"{}"}, f"{repo}:v1", tmp_path)
    clock = Clock()
    async with operations(registry_session.host, clock=clock) as fs:
        model = (await walk(fs.ops, repo)).st_ino
        first = await readdir(fs.ops, model, 0, room=1)
        assert [n for n, _, _ in first] == [digest]
        async with RegistryClient(registry_session.host, _options()) as client:
            await gallery.tag(client, parse(f"{registry_session.host}/{repo}:v1"), ["a-new"])
        clock.now += fs.tree.refresh + 1  # the listing is stale now
        rest = await readdir(fs.ops, model, first[-1][2])
        assert [n for n, _, _ in first + rest] == [digest, "v1"]
        assert await names(fs.ops, model) == ["a-new", digest, "v1"]


@pytest.mark.trio
async def test_readdir_of_a_file_is_enotdir(fs: Fs, pushed: Pushed) -> None:
    f = await walk(fs.ops, f"{REPO}/{pushed.digest}/config.json")
    assert await errno_of(fs.ops.readdir(f.st_ino, 0, Token())) == errno.ENOTDIR


# ---- data ----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_read_returns_the_pushed_bytes(fs: Fs, pushed: Pushed) -> None:
    ops = fs.ops
    data = FILES["weights.bin"]
    f = await walk(ops, f"{REPO}/{pushed.digest}/weights.bin")
    info = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert info.keep_cache  # immutable content: the kernel keeps its page cache
    got = bytearray()
    while len(got) < len(data):
        got += await ops.read(info.fh, len(got), 128 << 10)  # the kernel's buffered reads
    assert bytes(got) == data
    # Across a chunk boundary, at an odd offset; at and past the end.
    off = CHUNK - 333
    assert bytes(await ops.read(info.fh, off, 1000)) == data[off:off + 1000]
    assert bytes(await ops.read(info.fh, len(data) - 10, 100)) == data[-10:]
    assert bytes(await ops.read(info.fh, len(data), 100)) == b""

    small = await walk(ops, f"{REPO}/{pushed.digest}/config.json")
    other = await ops.open(small.st_ino, os.O_RDONLY, CTX)
    assert other.fh != info.fh
    assert bytes(await ops.read(other.fh, 0, 4096)) == FILES["config.json"]

    stats = json.loads(await ops.getxattr(ROOT_INODE, XATTR_STATS, CTX))
    assert stats["open_files"] == 2
    assert stats["registry_bytes"] >= len(data)
    await ops.release(info.fh)
    await ops.release(other.fh)
    assert await open_files(ops) == 0


@pytest.mark.trio
@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                                   os.O_WRONLY | os.O_APPEND])
async def test_open_for_writing_is_erofs(fs: Fs, pushed: Pushed, flags: int) -> None:
    f = await walk(fs.ops, f"{REPO}/{pushed.digest}/weights.bin")
    assert await errno_of(fs.ops.open(f.st_ino, flags, CTX)) == errno.EROFS
    assert await open_files(fs.ops) == 0


@pytest.mark.trio
async def test_open_of_a_folder_fails(fs: Fs, pushed: Pushed) -> None:
    # The kernel sends opendir, never open, for a folder: any refusal will do, as long
    # as no handle is made.
    for path in (REPO, f"{REPO}/{pushed.digest}", f"{REPO}/{pushed.digest}/tokenizer"):
        inode = (await walk(fs.ops, path)).st_ino
        assert await errno_of(fs.ops.open(inode, os.O_RDONLY, CTX)) in (
            errno.ENOENT, errno.EISDIR), path
    tag = (await walk(fs.ops, f"{REPO}/v1")).st_ino
    assert await errno_of(fs.ops.open(tag, os.O_RDONLY, CTX)) in (errno.ENOENT, errno.ELOOP)
    assert await open_files(fs.ops) == 0


# ---- extended attributes -------------------------------------------------------------------


@pytest.mark.trio
async def test_xattrs_of_files_revisions_and_tags(fs: Fs, pushed: Pushed) -> None:
    ops = fs.ops
    f = await walk(ops, f"{REPO}/{pushed.digest}/weights.bin")
    assert await ops.listxattr(f.st_ino, CTX) == sorted([XATTR_DIGEST, XATTR_MEDIATYPE])
    want = "sha256:" + hashlib.sha256(FILES["weights.bin"]).hexdigest()
    assert await ops.getxattr(f.st_ino, XATTR_DIGEST, CTX) == want.encode()
    assert await ops.getxattr(f.st_ino, XATTR_MEDIATYPE, CTX) \
        == modelpack.layer_media_type("weight").encode()
    for path in (f"{REPO}/{pushed.digest}", f"{REPO}/v1"):
        inode = (await walk(ops, path)).st_ino
        assert await ops.listxattr(inode, CTX) == [XATTR_DIGEST], path
        assert await ops.getxattr(inode, XATTR_DIGEST, CTX) == pushed.digest.encode(), path
    namespace = (await walk(ops, REPO)).st_ino
    assert await ops.listxattr(namespace, CTX) == []
    for inode in (f.st_ino, namespace):
        assert await errno_of(ops.getxattr(inode, b"user.other", CTX)) == pyfuse3.ENOATTR
    # The stats live on the root only.
    assert await errno_of(ops.getxattr(f.st_ino, XATTR_STATS, CTX)) == pyfuse3.ENOATTR


@pytest.mark.trio
async def test_stats_and_flush_on_the_root(fs: Fs, pushed: Pushed) -> None:
    ops = fs.ops
    await walk(ops, f"{REPO}/{pushed.digest}/weights.bin")
    assert await ops.listxattr(ROOT_INODE, CTX) == [XATTR_STATS]  # flush is not listed
    stats = json.loads(await ops.getxattr(ROOT_INODE, XATTR_STATS, CTX))
    assert stats["inodes"] == fs.tree.inode_count
    assert stats["open_files"] == 0
    assert stats["registry_bytes"] == fs.client.bytes_received  # the daemon's counters
    assert set(fs.reader.snapshot()) <= set(stats)  # and the reader's
    # Without a write-behind there is nothing owed: the flush answers at once.
    assert json.loads(await ops.getxattr(ROOT_INODE, XATTR_FLUSH, CTX)) == {"done": True, "owed": 0}


# ---- the read-only refusals ----------------------------------------------------------------

WRITES: dict[str, tuple[Any, ...]] = {
    "setattr": (ROOT_INODE, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
    "mknod": (ROOT_INODE, b"x", stat.S_IFREG | 0o644, 0, CTX),
    "mkdir": (ROOT_INODE, b"x", 0o755, CTX),
    "unlink": (ROOT_INODE, b"x", CTX),
    "rmdir": (ROOT_INODE, b"x", CTX),
    "symlink": (ROOT_INODE, b"x", b"target", CTX),
    "rename": (ROOT_INODE, b"x", ROOT_INODE, b"y", 0, CTX),
    "link": (ROOT_INODE, ROOT_INODE, b"x", CTX),
    "create": (ROOT_INODE, b"x", 0o644, os.O_WRONLY | os.O_CREAT, CTX),
    "write": (1, 0, b"bytes"),
    "setxattr": (ROOT_INODE, b"user.x", b"1", CTX),
    "removexattr": (ROOT_INODE, b"user.x", CTX),
}


@pytest.mark.trio
@pytest.mark.parametrize("op", sorted(WRITES))
async def test_write_operations_are_erofs(fs: Fs, op: str,
                                          debug_logs: pytest.LogCaptureFixture) -> None:
    assert await errno_of(getattr(fs.ops, op)(*WRITES[op])) == errno.EROFS
    assert not warnings(debug_logs)


@pytest.mark.trio
async def test_statfs(fs: Fs, pushed: Pushed) -> None:
    await walk(fs.ops, f"{REPO}/{pushed.digest}/weights.bin")
    st = await fs.ops.statfs(CTX)
    assert st.f_bsize == fs.reader.chunk_size
    assert st.f_files == fs.tree.inode_count
    assert st.f_bfree == st.f_bavail == st.f_ffree == 0  # nothing can be written
    assert st.f_namemax == 255


# ---- failures: errno and one log line ------------------------------------------------------


@pytest.mark.trio
async def test_unreachable_registry_is_eio_with_one_warning(
        debug_logs: pytest.LogCaptureFixture) -> None:
    # Nothing listens on the port: a real outage, no retries so no backoff to wait for.
    async with operations(f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=1)) as fs:
        # The root's attributes are known without the registry.
        assert stat.S_ISDIR((await fs.ops.getattr(ROOT_INODE, CTX)).st_mode)
        debug_logs.clear()
        assert await errno_of(fs.ops.lookup(ROOT_INODE, b"g", CTX)) == errno.EIO
    (record,) = warnings(debug_logs)
    assert record.name == "galleryfs.mount.operations"
    assert "lookup" in record.getMessage() and "registry unreachable" in record.getMessage()


@pytest.mark.trio
async def test_read_during_an_outage_is_eio_with_one_warning(
        registry: Registry, tmp_path: Path, debug_logs: pytest.LogCaptureFixture) -> None:
    data = os.urandom(2 * CHUNK)
    digest = await push(registry, {"weights.bin": data}, "g/m:v1", tmp_path)
    async with operations(registry.host, retry=RetryPolicy(attempts=1)) as fs:
        f = await walk(fs.ops, f"g/m/{digest}/weights.bin")
        info = await fs.ops.open(f.st_ino, os.O_RDONLY, CTX)
        registry.stop()
        debug_logs.clear()
        assert await errno_of(fs.ops.read(info.fh, 0, 4096)) == errno.EIO
    (record,) = [r for r in warnings(debug_logs) if r.name == "galleryfs.mount.operations"]
    assert "read" in record.getMessage()


@pytest.mark.trio
async def test_blob_the_registry_lost_is_eio(registry_session: Registry, tmp_path: Path,
                                             debug_logs: pytest.LogCaptureFixture) -> None:
    data = os.urandom(CHUNK + 1)  # this test's own blob: no other revision shares it
    repo = f"{GALLERY}-lost/m"
    digest = await push(registry_session, {"weights.bin": data}, f"{repo}:v1", tmp_path)
    blob = digests.of_bytes(data)
    async with httpx.AsyncClient(base_url=registry_session.url, trust_env=False) as http:
        assert (await http.delete(f"/v2/{repo}/blobs/{blob}")).status_code == 202
        assert (await http.get(f"/v2/{repo}/blobs/{blob}")).status_code == 404
    async with operations(registry_session.host) as fs:
        # The name is still there: the manifest lists the file.
        f = await walk(fs.ops, f"{repo}/{digest}/weights.bin")
        info = await fs.ops.open(f.st_ino, os.O_RDONLY, CTX)
        # Damaged data, not a missing name: ENOENT from read(2) would make no sense.
        assert await errno_of(fs.ops.read(info.fh, 0, 4096)) == errno.EIO
    # ... and said in the log, once, as damage.
    (record,) = [r for r in warnings(debug_logs) if r.name == "galleryfs.mount.operations"]
    assert blob in record.getMessage() and "EIO" in record.getMessage()


@pytest.mark.trio
async def test_unservable_layer_is_refused_at_open(registry_session: Registry,
                                                   debug_logs: pytest.LogCaptureFixture) -> None:
    repo = f"{GALLERY}-tar/m"
    tar = os.urandom(1000)
    config = b"{}"
    layer = modelpack.Descriptor("application/vnd.cncf.model.code.v1.tar", digests.of_bytes(tar),
                                 len(tar), {modelpack.ANNOTATION_FILEPATH: "src"})
    body = modelpack.build_manifest(
        modelpack.Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(config), len(config)), [layer])
    async with RegistryClient(registry_session.host, _options()) as client:
        await client.upload_blob_bytes(repo, digests.of_bytes(config), config)
        await client.upload_blob_bytes(repo, layer.digest, tar)
        digest = await client.put_manifest(repo, "v1", body, modelpack.OCI_MANIFEST)
    async with operations(registry_session.host) as fs:
        f = await walk(fs.ops, f"{repo}/{digest}/src")
        assert f.st_size == len(tar)  # listed with its size, so `ls -l` shows it
        assert XATTR_UNSUPPORTED in await fs.ops.listxattr(f.st_ino, CTX)
        assert await fs.ops.getxattr(f.st_ino, XATTR_UNSUPPORTED, CTX)  # says why
        debug_logs.clear()
        assert await errno_of(fs.ops.open(f.st_ino, os.O_RDONLY, CTX)) == errno.EOPNOTSUPP
        assert await open_files(fs.ops) == 0
    (record,) = warnings(debug_logs)
    assert "open" in record.getMessage() and "src" in record.getMessage()


# ---- the errno map -------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code"), [
    (ReadOnly("x"), errno.EROFS),
    (NotFound("x", 404), errno.ENOENT),
    (InvalidReference("x"), errno.ENOENT),
    (NotADirectoryError(5), errno.ENOTDIR),
    (AuthError("x", 401), errno.EACCES),
    (AuthError("x", 403), errno.EACCES),
    (errors.Unsigned("x"), errno.EACCES),
    (UnsupportedContent("x"), errno.EOPNOTSUPP),
    (NotServable("x"), errno.EOPNOTSUPP),
    (RegistryUnavailable("x"), errno.EIO),
    (DigestMismatch("x"), errno.EIO),
    (TooLarge("x"), errno.EIO),
    (RegistryError("x", 500), errno.EIO),
    (UsageError("x"), errno.EIO),
    (GalleryError("x"), errno.EIO),
    (OSError(errno.ECONNRESET, "x"), errno.EIO),
    (RuntimeError("x"), errno.EIO),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else errno.errorcode[v])
def test_errno_for(exc: BaseException, code: int) -> None:
    assert errno_for(exc) == code


def test_errno_for_every_error_class_is_chosen() -> None:
    """A new class in errors.py gets a row above (or a subclass's errno on purpose)."""
    classes = {c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, GalleryError)}
    covered = {GalleryError, UsageError, InvalidReference, RegistryError, AuthError, NotFound,
               TooLarge, RegistryUnavailable, DigestMismatch, UnsupportedContent,
               errors.BlobMissing, errors.Unsigned}
    assert classes - covered == set()


def test_errno_for_a_lost_blob_is_eio() -> None:
    assert issubclass(errors.BlobMissing, RegistryError)
    assert errno_for(errors.BlobMissing("gone", 404)) == errno.EIO


def test_errno_for_a_group_reports_its_first_gallery_error() -> None:
    group = ExceptionGroup("nursery", [ValueError("x"), NotFound("x")])
    assert errno_for(group) == errno.ENOENT
    assert errno_for(ExceptionGroup("nursery", [ExceptionGroup("inner", [ReadOnly("x")])])) \
        == errno.EROFS
    assert errno_for(ExceptionGroup("nursery", [ValueError("x")])) == errno.EIO


class _Raising:
    """The smallest owner of fuse_errors-wrapped methods."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @fuse_errors
    async def read(self) -> bytes:
        raise self.exc


@pytest.mark.trio
@pytest.mark.parametrize(("exc", "level"), [
    (NotFound("x"), logging.DEBUG),
    (ReadOnly("x"), logging.DEBUG),
    (NotADirectoryError(5), logging.DEBUG),
    (RegistryUnavailable("connection refused"), logging.WARNING),
    (DigestMismatch("bad bytes"), logging.WARNING),
    (AuthError("denied", 403), logging.WARNING),
    (OSError(errno.EIO, "disk"), logging.WARNING),
    (RuntimeError("bug"), logging.ERROR),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else logging.getLevelName(v))
async def test_fuse_errors_logs_once_at_its_level(exc: BaseException, level: int,
                                                  debug_logs: pytest.LogCaptureFixture) -> None:
    assert await errno_of(_Raising(exc).read()) == errno_for(exc)  # type: ignore[arg-type]
    (record,) = debug_logs.records
    assert record.levelno == level
    assert record.getMessage().startswith("read")
    # An unexpected error keeps its traceback; the expected ones are one line.
    assert (record.exc_info is not None) == (level == logging.ERROR)


@pytest.mark.trio
async def test_fuse_errors_passes_fuse_errors_through_unlogged(
        debug_logs: pytest.LogCaptureFixture) -> None:
    assert await errno_of(_Raising(pyfuse3.FUSEError(errno.ERANGE)).read()) == errno.ERANGE
    assert debug_logs.records == []
