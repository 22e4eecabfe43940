"""A real kernel mount of a real registry, served by a galleryfs subprocess."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from galleryfs import gallery
from galleryfs.errors import UsageError
from galleryfs.gallery.locations import BlobLocations
from galleryfs.mount.config import MountConfig
from galleryfs.mount.daemon import mount_main
from galleryfs.mount.unmount import unmount_main
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.mounting import fuse_available
from tests.registry_harness import Registry

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")]

MOUNT_TIMEOUT = 30.0


def push(registry: Registry, directory: Path, ref: str) -> str:
    async def go() -> str:
        options = ClientOptions(plain_http=True, timeout=30)
        async with RegistryClient(registry.host, options) as client:
            result = await gallery.push(client, directory, parse(f"{registry.host}/{ref}"),
                                        locations=BlobLocations(directory / ".." / "loc.json"))
            return result.digest

    return trio.run(go)


def push_weights(registry: Registry, tmp_path: Path, ref: str, size: int) -> bytes:
    """Push a model of one random `weights.bin` of `size` bytes; its bytes."""
    src = tmp_path / "model"
    src.mkdir()
    data = os.urandom(size)
    (src / "weights.bin").write_bytes(data)
    push(registry, src, ref)
    return data


def move_tag(registry: Registry, repo: str, from_tag: str, to_tag: str) -> None:
    accept = "application/vnd.oci.image.manifest.v1+json"
    with httpx.Client(base_url=registry.url, timeout=30) as http:
        r = http.get(f"/v2/{repo}/manifests/{from_tag}", headers={"Accept": accept})
        r.raise_for_status()
        r = http.put(f"/v2/{repo}/manifests/{to_tag}", content=r.content,
                     headers={"Content-Type": r.headers["content-type"]})
        assert r.status_code == 201, r.text


def wait_for_mount(proc: subprocess.Popen[bytes] | None, mountpoint: Path, log: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint) and not _stale(mountpoint):
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"galleryfs exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"mount did not appear within {MOUNT_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def unmount(mountpoint: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    if os.path.ismount(mountpoint) or _stale(mountpoint):
        r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
    if proc is not None:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if os.path.ismount(mountpoint):  # it mounted after all, then was killed
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def _stale(mountpoint: Path) -> bool:
    try:
        os.statvfs(mountpoint)  # a stat or a listing could be answered from kernel caches
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def start_foreground(source: str, mountpoint: Path, cache: Path, log: Path,
                     *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "galleryfs", "mount", source, str(mountpoint), "-f",
             "--plain-http", "--cache-dir", str(cache), "--timeout", "5", *extra],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd="/")


def stats(mountpoint: Path) -> dict:
    return json.loads(os.getxattr(mountpoint, "user.galleryfs.stats"))


def files_of(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Mounted:
    registry: Registry
    mnt: Path
    model: Path
    source: Path
    digest: str
    small_digest: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def revision(self) -> Path:
        return self.model / self.digest


@pytest.fixture(scope="module")
def mounted(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("mount")
    small = base / "small"
    small.mkdir()
    (small / "config.json").write_text('{"small": true}\n')
    reg = Registry("plain")
    reg.start()
    mnt = base / "mnt"
    mnt.mkdir()
    log = base / "galleryfs.log"
    proc = None
    try:
        digest = push(reg, model_dir, "team/minilm:latest")
        move_tag(reg, "team/minilm", "latest", "stable")
        small_digest = push(reg, small, "team/minilm:small")
        push(reg, small, "team/minilm/base:latest")  # a nested model
        proc = start_foreground(reg.host, mnt, base / "cache", log, "--refresh", "1")
        wait_for_mount(proc, mnt, log)
        yield Mounted(reg, mnt, mnt / "team" / "minilm", model_dir, digest, small_digest,
                      proc, log)
    finally:
        unmount(mnt, proc)
        reg.close()
    assert not os.path.ismount(mnt)


def test_safe_open_reads_one_tensor_lazily(mounted: Mounted) -> None:
    from safetensors import safe_open

    path = mounted.revision / "model.safetensors"
    size = path.stat().st_size
    def fetched() -> int:
        # A file pushed without a chunk table is verified whole before its first byte
        # (--verify strict): that stream is not the lazy read's doing.
        got = stats(mounted.mnt)
        return got["registry_bytes"] - got["derived_bytes"]

    before = fetched()
    with safe_open(str(mounted.source / "model.safetensors"), framework="numpy") as src:
        name = sorted(src.keys())[-1]
        expected = src.get_tensor(name)
    with safe_open(str(path), framework="numpy") as f:
        got = f.get_tensor(name)
    assert (got == expected).all()
    served = fetched() - before
    assert 0 < served < size / 3, (served, size)


def test_tree_listing_and_attributes(mounted: Mounted) -> None:
    mnt = mounted.mnt
    assert sorted(os.listdir(mnt)) == ["team"]
    assert sorted(os.listdir(mnt / "team")) == ["minilm"]
    assert sorted(os.listdir(mounted.model)) == sorted(
        ["base", "latest", "small", "stable", mounted.digest, mounted.small_digest])
    assert sorted(os.listdir(mounted.model / "base")) == sorted(
        ["latest", mounted.small_digest])
    source_files = files_of(mounted.source)
    mounted_files = files_of(mounted.revision)
    assert sorted(mounted_files) == sorted(source_files)
    for rel, path in mounted_files.items():
        st = path.stat()
        assert st.st_size == source_files[rel].stat().st_size
        assert stat.S_IMODE(st.st_mode) == 0o444 and stat.S_ISREG(st.st_mode)
        assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
        assert st.st_blocks == math.ceil(st.st_size / 512)
    d = mounted.revision.stat()
    assert stat.S_IMODE(d.st_mode) == 0o555 and stat.S_ISDIR(d.st_mode)
    assert stat.S_IMODE(os.lstat(mounted.model / "latest").st_mode) == 0o777


def test_shell_tools(mounted: Mounted, tmp_path: Path) -> None:
    total = sum(p.stat().st_size for p in files_of(mounted.source).values())
    du = subprocess.run(["du", "-sb", str(mounted.revision)], capture_output=True, text=True,
                        check=True, timeout=60)
    assert int(du.stdout.split()[0]) == total
    found = subprocess.run(["find", str(mounted.revision), "-type", "f"], capture_output=True,
                           text=True, check=True, timeout=60).stdout.split()
    assert sorted(str(Path(p).relative_to(mounted.revision)) for p in found) == sorted(
        files_of(mounted.source))
    ls = subprocess.run(["ls", "-R", str(mounted.mnt)], capture_output=True, text=True,
                        check=True, timeout=60).stdout
    assert "model.safetensors" in ls and "1_Pooling" in ls
    subprocess.run(["stat", str(mounted.revision / "config.json")], check=True,
                   capture_output=True, timeout=30)
    dest = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(mounted.revision), str(dest)], check=True, timeout=120)
    for rel, src in files_of(mounted.source).items():
        subprocess.run(["cmp", str(src), str(dest / rel)], check=True, timeout=60)
        subprocess.run(["cmp", str(src), str(mounted.revision / rel)], check=True, timeout=60)
    assert stats(mounted.mnt)["digest_failures"] == 0


def test_full_mmap_load_equals_source(mounted: Mounted) -> None:
    from safetensors.numpy import load_file

    got = load_file(str(mounted.revision / "model.safetensors"))
    expected = load_file(str(mounted.source / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert (got[name] == tensor).all(), name


def test_tag_symlinks_and_moves(mounted: Mounted) -> None:
    latest = mounted.model / "latest"
    assert os.readlink(latest) == mounted.digest
    assert (latest / "config.json").read_bytes() == (mounted.source / "config.json").read_bytes()
    assert os.readlink(mounted.model / "stable") == mounted.digest
    move_tag(mounted.registry, "team/minilm", "small", "stable")
    deadline = time.monotonic() + 15
    while os.readlink(mounted.model / "stable") != mounted.small_digest:
        assert time.monotonic() < deadline, "moved tag did not show within the refresh bound"
        time.sleep(0.2)
    assert json.loads((mounted.model / "stable" / "config.json").read_text()) == {"small": True}


def test_listing_shows_a_new_tag_within_the_refresh_bound(mounted: Mounted) -> None:
    assert "fresh" not in os.listdir(mounted.model)  # the kernel caches this listing
    move_tag(mounted.registry, "team/minilm", "small", "fresh")
    deadline = time.monotonic() + 15
    while "fresh" not in os.listdir(mounted.model):
        assert time.monotonic() < deadline, "a new tag did not show within the refresh bound"
        time.sleep(0.2)
    assert os.readlink(mounted.model / "fresh") == mounted.small_digest


def test_xattrs(mounted: Mounted) -> None:
    f = mounted.revision / "config.json"
    expected = "sha256:" + hashlib.sha256((mounted.source / "config.json").read_bytes()).hexdigest()
    assert os.getxattr(f, "user.galleryfs.digest").decode() == expected
    assert os.getxattr(f, "user.galleryfs.mediatype").decode().startswith(
        "application/vnd.cncf.model.")
    assert os.getxattr(mounted.revision, "user.galleryfs.digest").decode() == mounted.digest
    out = subprocess.run(["getfattr", "-d", "-m", "-", str(f)], capture_output=True, text=True,
                         timeout=30).stdout
    assert "user.galleryfs.digest" in out and "user.galleryfs.mediatype" in out
    s = stats(mounted.mnt)
    for key in ("registry_bytes", "registry_requests", "memory_hits", "memory_misses",
                "disk_hits", "disk_misses", "readahead_windows"):
        assert key in s
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "user.nothing")
    assert exc.value.errno == errno.ENODATA


def test_read_only_and_unknown_names(mounted: Mounted) -> None:
    f = mounted.revision / "config.json"
    attempts = [
        lambda: open(f, "r+b"),
        lambda: open(f, "ab"),
        lambda: open(mounted.revision / "new.txt", "wb"),
        lambda: os.mkdir(mounted.revision / "d"),
        lambda: os.unlink(f),
        lambda: os.rename(f, mounted.revision / "x"),
        lambda: os.symlink("x", mounted.model / "link"),
        lambda: os.chmod(f, 0o644),
        lambda: os.setxattr(f, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    for missing in (mounted.mnt / "nope", mounted.model / "nosuchtag",
                    mounted.model / ("sha256:" + "0" * 64), mounted.revision / "nope"):
        with pytest.raises(FileNotFoundError):
            os.stat(missing)


def test_outage_gives_eio_then_recovers_in_background_mode(
        registry: Registry, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    payload = os.urandom(3 << 20)
    (data / "weights.bin").write_bytes(payload)
    push(registry, data, "g/outage:latest")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    # `galleryfs mount` in the background: returns once mounted.
    try:
        r = subprocess.run(
            [sys.executable, "-m", "galleryfs", "mount", registry.host + "/g", str(mnt),
             "--plain-http", "--timeout", "3", "--cache-dir", str(cache), "--cache-size", "1G",
             "--refresh", "1", "--chunk-size", "1M"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)  # ready when `galleryfs mount` returned
        f = mnt / "outage" / "latest" / "weights.bin"
        with open(f, "rb") as fh:
            assert fh.read(4096) == payload[:4096]
        registry.stop()
        start = time.monotonic()
        with pytest.raises(OSError) as exc, open(f, "rb") as fh:
            fh.seek(2 << 20)
            fh.read(4096)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - start < 20
        registry.restart()
        with open(f, "rb") as fh:
            fh.seek(2 << 20)
            assert fh.read(4096) == payload[2 << 20:(2 << 20) + 4096]
        assert unmount_main(str(mnt)) == 0
        deadline = time.monotonic() + 10
        while os.path.ismount(mnt):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        unmount(mnt)


def test_bad_mountpoints_and_stale_mount_recovery(registry: Registry, tmp_path: Path) -> None:
    def mount_on(path: Path) -> int:
        config = MountConfig(registry.host, str(path), ClientOptions(plain_http=True, timeout=3),
                             cache_dir=str(tmp_path / "c"), cache_size=1 << 30, refresh=1.0,
                             chunk_size=1 << 20)
        return mount_main(config, foreground=False)

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        mount_on(full)
    with pytest.raises(UsageError, match="not a directory"):
        mount_on(full / "x")
    with pytest.raises(UsageError, match="no such directory"):
        mount_on(tmp_path / "absent")

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    proc = start_foreground(registry.host, mnt, tmp_path / "c", log)
    try:
        wait_for_mount(proc, mnt, log)
        with pytest.raises(UsageError, match="already a mount point"):
            mount_on(mnt)
        proc.kill()  # a crashed daemon leaves "Transport endpoint is not connected"
        proc.wait(timeout=10)
        assert _stale(mnt)
        proc = start_foreground(registry.host, mnt, tmp_path / "c", log)
        wait_for_mount(proc, mnt, log)
        assert os.listdir(mnt) == []  # an empty registry
        assert "cleaning up" in log.read_text()
    finally:
        unmount(mnt, proc)
    assert not os.path.ismount(mnt) and not _stale(mnt)


def test_cache_size_zero_reads_without_a_disk_cache(registry: Registry, tmp_path: Path) -> None:
    data = push_weights(registry, tmp_path, "g/m:v1", (3 << 20) + 4321)
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "log"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, cache, log, "--cache-size", "0")
    try:
        wait_for_mount(proc, mnt, log)
        path = mnt / "g" / "m" / "v1" / "weights.bin"
        assert path.read_bytes() == data
        with open(path, "rb") as f:
            f.seek(1 << 20)
            assert f.read(100) == data[1 << 20:(1 << 20) + 100]
        got = stats(mnt)
        assert "disk_bytes" not in got and got["disk_hits"] == 0
        assert got["registry_bytes"] >= len(data)
    finally:
        unmount(mnt, proc)
    # Nothing of the blob was written under the cache directory (it holds only logs).
    written = [p for p in cache.rglob("*") if p.is_file() and "logs" not in p.parts]
    assert written == []


def test_warm_listings_are_served_by_the_kernel(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "a.bin").write_bytes(b"a" * 100)
    digest = push(registry, src, "listings/m:v1")
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "log"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, cache, log, "--refresh", "300")
    try:
        wait_for_mount(proc, mnt, log)

        def walk() -> list[tuple[str, list[str], list[str]]]:
            return sorted((d, sorted(dirs), sorted(files))
                          for d, dirs, files in os.walk(mnt / "listings"))

        first = walk()
        assert (str(mnt / "listings" / "m" / digest / "sub"), [], ["a.bin"]) in first
        requests = stats(mnt)["readdir_requests"]
        assert requests >= len(first)
        assert walk() == first
        # Within the refresh time, a listing read once comes from the kernel's cache.
        assert stats(mnt)["readdir_requests"] == requests
    finally:
        unmount(mnt, proc)


def test_disk_cache_is_written_after_the_read_from_the_page_cache(registry: Registry,
                                                                  tmp_path: Path) -> None:
    data = push_weights(registry, tmp_path, "fill/m:v1", (9 << 20) + 4321)  # three 4 MiB chunks
    blob = "sha256:" + hashlib.sha256(data).hexdigest()
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "log"
    mnt.mkdir()
    path = mnt / "fill" / "m" / "v1" / "weights.bin"
    complete = cache / "blobs" / "sha256" / blob.split(":")[1]
    proc = start_foreground(registry.host, mnt, cache, log)
    try:
        wait_for_mount(proc, mnt, log)
        assert path.read_bytes() == data
        # What `galleryfs unmount` does first: the daemon writes what it owes.
        assert json.loads(os.getxattr(mnt, "user.galleryfs.flush")) == {"done": True, "owed": 0}
        got = stats(mnt)
        assert complete.exists()
        assert got["fill_chunks"] == 3 and got["fill_owed"] == 0 and got["fill_missed"] == 0
        assert got["fill_dropped"] == 0
        # From the page cache or memory: filling the cache fetched nothing again.
        # (A file pushed without a chunk table was also streamed once to verify it whole.)
        assert got["registry_bytes"] - got["derived_bytes"] == len(data)
        assert unmount_main(str(mnt)) == 0
        proc.wait(timeout=15)
        # Remounted: the bytes come from the disk cache.
        proc = start_foreground(registry.host, mnt, cache, log)
        wait_for_mount(proc, mnt, log)
        assert path.read_bytes() == data
        assert stats(mnt)["registry_bytes"] == 0
    finally:
        unmount(mnt, proc)


def test_sigterm_writes_the_disk_cache_before_unmounting(registry: Registry,
                                                         tmp_path: Path) -> None:
    data = push_weights(registry, tmp_path, "fill/term:v1", (5 << 20) + 17)
    hexdigest = hashlib.sha256(data).hexdigest()
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "log"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, cache, log)
    try:
        wait_for_mount(proc, mnt, log)
        assert (mnt / "fill" / "term" / "v1" / "weights.bin").read_bytes() == data
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
        assert (cache / "blobs" / "sha256" / hexdigest).exists()
    finally:
        unmount(mnt, proc)


def test_unmount_of_a_busy_mount_says_so_and_debug_logs_requests(registry: Registry,
                                                                 tmp_path: Path) -> None:
    """`galleryfs unmount` of a mount with an open file fails with a message naming the
    cause (no traceback) and leaves the mount working; once the file is closed it
    unmounts. `--debug` logs each FUSE request the daemon serves."""
    from tests.mounting import galleryfs, isolated_env, mounted

    data = push_weights(registry, tmp_path, "g/m:v1", 100_000)
    env = isolated_env(tmp_path)
    cache = tmp_path / "cache"
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                 str(cache), "--debug") as mnt:
        path = mnt / "g" / "m" / "v1" / "weights.bin"
        with open(path, "rb") as f:
            busy = galleryfs("unmount", str(mnt), env=env)
            assert busy.returncode != 0
            assert "busy" in busy.stderr and "Traceback" not in busy.stderr, busy.stderr
            assert os.path.ismount(mnt)
            assert f.read() == data  # still served
    # `mounted` unmounted it (and asserted that this time it worked).
    (log,) = (cache / "logs").glob("mount-*.log")
    text = log.read_text()
    assert "Traceback" not in text
    # libfuse's request trace (the "debug" mount option) and our DEBUG records.
    assert "opcode: LOOKUP" in text and "opcode: READ" in text
    assert "galleryfs: DEBUG:" in text
