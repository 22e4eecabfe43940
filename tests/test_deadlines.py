"""Every wait on the registry is bounded by `--timeout` (README, "Failure behaviour"):
a frozen (SIGSTOP) or trickling registry fails a CLI command or a read through the mount
within `--timeout` and a little, retries included; a slow but steady one does not;
`galleryfs unmount` returns within 15 s whatever the registry or the daemon does; a
pull stopped by SIGTERM leaves no staging folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from galleryfs import gallery
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.mounting import fuse_available, isolated_env
from tests.registry_harness import Registry
from tests.test_mount import stats
from tests.trickle import TrickleProxy, frozen

# What "a little" is: the deadline's own slack (a tenth), a FUSE round trip, on a loaded
# 2-core machine; a CLI command also starts a Python process (a second or two when the
# machine is busy). Without the bounds, these waits took 2x to 100x the timeout.
SLACK = 2.5
CLI_SLACK = 5.0


def _push(registry: Registry, tmp_path: Path, files: dict[str, bytes],
          ref: str = "g/m:v1") -> None:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)

    async def go() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            await gallery.push(client, src, parse(f"{registry.host}/{ref}"))

    trio.run(go)


def _cli(tmp_path: Path, *args: str, within: float) -> tuple[subprocess.CompletedProcess[str],
                                                             float]:
    """`galleryfs ARGS` in a subprocess; its result and how long it took. Killed (and the
    test failed) well after `within`, so a hang shows as a failure, not a stuck suite."""
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "galleryfs", *args], capture_output=True,
                                text=True, timeout=within + 20, env=isolated_env(tmp_path),
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"galleryfs {' '.join(args)} still running after {within + 20:g}s")
    return result, time.monotonic() - start


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("galleryfs: error: "), result.stderr
    return lines[0]


def is_mounted(path: str) -> bool:
    """From the kernel's mount table: a stat of a mount whose daemon is stopped blocks."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f]
    return path.replace(" ", "\\040") in points


# ---- the CLI ------------------------------------------------------------------------


def test_commands_on_a_trickling_registry_fail_within_timeout(registry: Registry,
                                                              tmp_path: Path) -> None:
    """Manifests, tag lists, blobs sent a byte a second: `inspect`, `ls`, `pull` and
    `mount` each give up after --timeout with one line (they ran for minutes before:
    httpx's read timeout is per receive, and a byte a second never trips it)."""
    _push(registry, tmp_path, {"config.json": b'{"model_type": "bert"}'})
    timeout = 2.0
    opts = ["--plain-http", "--timeout", str(timeout)]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with TrickleProxy(registry.url) as proxy:
        proxy.trickle(r"^GET /v2/.+", 1)
        for args in (["inspect", f"{proxy.host}/g/m:v1"], ["ls", f"{proxy.host}/g/m"],
                     ["pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out")],
                     ["mount", f"{proxy.host}/g/m", str(mnt), "--cache-dir",
                      str(tmp_path / "cache")]):
            result, took = _cli(tmp_path, *args, *opts, within=timeout)
            line = _one_line_error(result)
            assert "stalled" in line or "no answer" in line, line
            assert took < timeout + CLI_SLACK, f"{args[0]} took {took:.1f}s"
    assert not (tmp_path / "out").exists() and not is_mounted(str(mnt))
    assert not list(tmp_path.glob(".out.galleryfs-*"))


def test_pull_of_a_trickled_blob_fails_within_timeout(registry: Registry,
                                                      tmp_path: Path) -> None:
    """A 300-byte file sent a byte a second: pull took 300 s, now --timeout."""
    _push(registry, tmp_path, {"weights.bin": os.urandom(300)})
    timeout = 2.0
    with TrickleProxy(registry.url) as proxy:
        proxy.trickle(r"^GET /v2/.+/blobs/", 1)
        result, took = _cli(tmp_path, "pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out"),
                            "--plain-http", "--quiet", "--timeout", str(timeout),
                            within=timeout)
        assert proxy.held  # the blob was being trickled when pull gave up
    assert "stalled" in _one_line_error(result)
    assert took < timeout + CLI_SLACK, f"pull took {took:.1f}s"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.galleryfs-*"))


def test_pull_of_a_frozen_registry_fails_within_timeout(registry: Registry,
                                                        tmp_path: Path) -> None:
    _push(registry, tmp_path, {"config.json": b"{}"})
    timeout = 2.0
    with frozen(registry):
        result, took = _cli(tmp_path, "pull", f"{registry.host}/g/m:v1",
                            str(tmp_path / "out"), "--plain-http", "--timeout", str(timeout),
                            within=timeout)
    assert "no answer" in _one_line_error(result) or "did not answer" in result.stderr
    assert took < timeout + CLI_SLACK, f"pull took {took:.1f}s"


def test_a_slow_but_steady_pull_is_not_cut_short(registry: Registry, tmp_path: Path) -> None:
    """The deadline is for a stall, not for the whole transfer: 2 MiB at 512 KiB/s takes
    twice --timeout and succeeds."""
    data = os.urandom(2 << 20)
    _push(registry, tmp_path, {"weights.bin": data})
    timeout = 2.0
    with TrickleProxy(registry.url) as proxy:
        proxy.trickle(r"^GET /v2/.+/blobs/", 512 << 10)
        result, took = _cli(tmp_path, "pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out"),
                            "--plain-http", "--quiet", "--timeout", str(timeout),
                            within=30)
    assert result.returncode == 0, result.stderr
    assert took > 2 * timeout  # it did take longer than the timeout, as a whole
    assert (tmp_path / "out" / "weights.bin").read_bytes() == data


def test_sigterm_during_pull_removes_the_staging_folder(registry: Registry,
                                                        tmp_path: Path) -> None:
    _push(registry, tmp_path, {"weights.bin": os.urandom(300)})
    with TrickleProxy(registry.url) as proxy:
        proxy.trickle(r"^GET /v2/.+/blobs/", 1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "galleryfs", "pull", f"{proxy.host}/g/m:v1",
             str(tmp_path / "out"), "--plain-http", "--quiet", "--timeout", "60"],
            env=isolated_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not (list(tmp_path.glob(".out.galleryfs-*")) and proxy.held):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the pull never started downloading"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    assert proc.returncode != 0
    assert not list(tmp_path.glob(".out.galleryfs-*"))
    assert proc.returncode == 128 + signal.SIGTERM  # as if killed by it, but cleaned up
    assert not (tmp_path / "out").exists()
    assert "SIGTERM" in err and "Traceback" not in err, err


# ---- the mount ----------------------------------------------------------------------

mount = pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")


def _mount(source: str, mnt: Path, tmp_path: Path, *options: str) -> None:
    mnt.mkdir(exist_ok=True)
    result, _ = _cli(tmp_path, "mount", source, str(mnt), "--plain-http", "--cache-dir",
                     str(tmp_path / "cache"), *options, within=30)
    assert result.returncode == 0, result.stderr


def _daemon_pid(tmp_path: Path) -> int | None:
    """The mount daemon started with this test's environment."""
    marker = f"XDG_CACHE_HOME={tmp_path / 'cache'}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (b"galleryfs.mount.daemon" in (entry / "cmdline").read_bytes()
                    and marker in (entry / "environ").read_bytes().split(b"\0")):
                return int(entry.name)
        except OSError:
            continue
    return None


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[Path]:
    """The mountpoint; afterwards unmounted (lazily if need be) and its daemon gone."""
    mnt = tmp_path / "mnt"
    yield mnt
    pid = _daemon_pid(tmp_path)
    if is_mounted(str(mnt)):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=10)
    if pid is not None:
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while _daemon_pid(tmp_path) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if _daemon_pid(tmp_path) is not None:
            os.kill(pid, signal.SIGKILL)
    assert not is_mounted(str(mnt))


def _timed_read(path: Path, offset: int, size: int) -> tuple[OSError | bytes, float]:
    start = time.monotonic()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            out: OSError | bytes = f.read(size)
    except OSError as exc:
        out = exc
    return out, time.monotonic() - start


@mount
def test_read_from_a_frozen_registry_fails_within_timeout(registry: Registry, tmp_path: Path,
                                                          cleanup: Path) -> None:
    """A read of bytes not yet fetched, registry SIGSTOPped: EIO after --timeout (a read
    waited 2x to 6x --timeout before: a fetch bound of twice the timeout, a retry after
    the direct path's own socket timeout, a span's timeout for every piece)."""
    _push(registry, tmp_path, {"a.bin": os.urandom(3 << 20), "b.bin": os.urandom(3 << 20)})
    timeout = 3.0
    _mount(registry.host, cleanup, tmp_path, "--timeout", str(timeout), "--chunk-size", "1M")
    revision = cleanup / "g" / "m" / "v1"
    os.stat(revision / "b.bin")  # the listing is in hand before the registry freezes
    with frozen(registry):
        got, took = _timed_read(revision / "b.bin", 0, 4096)
    assert isinstance(got, OSError) and got.errno == errno.EIO, got
    assert took < timeout + SLACK, f"the read took {took:.1f}s"
    # The registry back, the same read works (once the stall is forgotten: a second).
    want = (tmp_path / "src" / "b.bin").read_bytes()[:4096]
    deadline = time.monotonic() + 15
    while (got := _timed_read(revision / "b.bin", 0, 4096)[0]) != want:
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert _cli(tmp_path, "unmount", str(cleanup), within=15)[0].returncode == 0


@mount
def test_listing_walk_with_a_frozen_registry_waits_once(registry: Registry, tmp_path: Path,
                                                         cleanup: Path) -> None:
    """Listings expired, registry frozen: `ls g/m` walks the catalog (root) and the
    model's tags, and waited --timeout for each (and for each of the kernel's requests);
    now the first unanswered listing keeps the others' old listings for a while, and a
    model never listed fails at once."""
    _push(registry, tmp_path, {"a.bin": b"a"})
    _push(registry, tmp_path / "src", {"b.bin": b"b"}, ref="h/n:v1")
    timeout = 3.0
    _mount(registry.host, cleanup, tmp_path, "--timeout", str(timeout), "--refresh", "1")
    assert "v1" in os.listdir(cleanup / "g" / "m")
    with frozen(registry):
        time.sleep(1.2)  # the --refresh period passes: every listing is due again
        start = time.monotonic()
        assert "v1" in os.listdir(cleanup / "g" / "m")  # the old listing
        took = time.monotonic() - start
        assert took < timeout + SLACK, f"ls took {took:.1f}s"
        start = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.listdir(cleanup / "h" / "n")
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - start < SLACK


@mount
def test_read_of_a_trickled_blob_fails_within_timeout(registry: Registry, tmp_path: Path,
                                                      cleanup: Path) -> None:
    """Blob bytes a byte a second: EIO after --timeout (4x --timeout before)."""
    _push(registry, tmp_path, {"a.bin": os.urandom(3 << 20)})
    timeout = 3.0
    with TrickleProxy(registry.url) as proxy:
        _mount(proxy.host, cleanup, tmp_path, "--timeout", str(timeout), "--chunk-size", "1M")
        path = cleanup / "g" / "m" / "v1" / "a.bin"
        os.stat(path)
        proxy.trickle(r"^GET /v2/.+/blobs/", 1)
        got, took = _timed_read(path, 0, 4096)
        assert isinstance(got, OSError) and got.errno == errno.EIO, got
        assert took < timeout + SLACK, f"the read took {took:.1f}s"
        proxy.clear()
        assert _cli(tmp_path, "unmount", str(cleanup), within=15)[0].returncode == 0


@mount
def test_a_slow_but_steady_blob_reads_through_the_mount(registry: Registry, tmp_path: Path,
                                                        cleanup: Path) -> None:
    """4 MiB at 1 MiB/s through a mount with --timeout 2: the first read waits for the
    whole blob to be verified (--verify strict, the table's chunks do not fit 1M chunks),
    twice the timeout, and succeeds: the deadline is for a stall."""
    data = os.urandom(4 << 20)
    _push(registry, tmp_path, {"a.bin": data})
    with TrickleProxy(registry.url) as proxy:
        _mount(proxy.host, cleanup, tmp_path, "--timeout", "2", "--chunk-size", "1M",
               "--cache-size", "0")
        path = cleanup / "g" / "m" / "v1" / "a.bin"
        os.stat(path)
        proxy.trickle(r"^GET /v2/.+/blobs/", 1 << 20)
        start = time.monotonic()
        assert path.read_bytes() == data
        assert time.monotonic() - start > 3
        assert _cli(tmp_path, "unmount", str(cleanup), within=15)[0].returncode == 0



@mount
def test_a_steady_blob_slower_than_a_chunk_per_timeout_reads(registry: Registry,
                                                             tmp_path: Path,
                                                             cleanup: Path) -> None:
    """512 KiB at 96 KiB/s (some 290 KiB per --timeout 3, four times the 64 KiB rule),
    read through the mount in one chunk: it failed with `no answer from the registry
    within 3s` (the direct path's buffered `readinto` returned only once the whole chunk
    had arrived, so no byte was counted as progress until then)."""
    data = os.urandom(512 << 10)
    _push(registry, tmp_path, {"a.bin": data})
    with TrickleProxy(registry.url) as proxy:
        _mount(proxy.host, cleanup, tmp_path, "--timeout", "3", "--cache-size", "0")
        path = cleanup / "g" / "m" / "v1" / "a.bin"
        os.stat(path)
        proxy.trickle(r"^GET /v2/.+/blobs/", 96 << 10)
        start = time.monotonic()
        assert path.read_bytes() == data
        assert time.monotonic() - start > 3  # longer than --timeout as a whole
        assert _cli(tmp_path, "unmount", str(cleanup), within=15)[0].returncode == 0

@mount
def test_unmount_with_a_frozen_registry_and_owed_chunks(registry: Registry, tmp_path: Path,
                                                        cleanup: Path) -> None:
    """Chunks owed to the disk cache, gone from the page cache, the registry frozen: the
    write-behind gives them up without asking the registry (it fetched them again once,
    and an unmount waited for that fetch, twice --timeout), and unmount returns within
    15 s."""
    data = os.urandom(6 << 20)
    _push(registry, tmp_path, {"a.bin": data})
    _mount(registry.host, cleanup, tmp_path, "--timeout", "30", "--chunk-size", "1M")
    path = cleanup / "g" / "m" / "v1" / "a.bin"
    with open(path, "rb") as f:
        assert f.read() == data
        # The kernel forgets the file's pages before the write-behind asks for them.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with frozen(registry):
        deadline = time.monotonic() + 20
        while (got := stats(cleanup))["fill_owed"] or not got["fill_dropped"]:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        assert got["fill_missed"] == 0
        # Each chunk written once, at the read (the first of a file read outside a stream
        # until half a chunk was covered: completed from its pieces) or by the fill, or
        # dropped.
        assert got["stores"] + got["fill_dropped"] == 6, got
        result, took = _cli(tmp_path, "unmount", str(cleanup), within=15)
    assert result.returncode == 0, result.stderr
    assert took < 15, f"unmount took {took:.1f}s"
    assert not is_mounted(str(cleanup))


@mount
def test_unmount_of_a_stopped_daemon_is_lazy_and_bounded(registry: Registry, tmp_path: Path,
                                                         cleanup: Path) -> None:
    _push(registry, tmp_path, {"a.bin": b"x" * 1000})
    _mount(registry.host, cleanup, tmp_path, "--timeout", "5")
    assert (cleanup / "g" / "m" / "v1" / "a.bin").read_bytes() == b"x" * 1000
    pid = _daemon_pid(tmp_path)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    result, took = _cli(tmp_path, "unmount", str(cleanup), within=15)
    assert result.returncode == 0, result.stderr
    assert took < 15, f"unmount took {took:.1f}s"
    assert "did not answer" in result.stderr and "lazily" in result.stderr, result.stderr
    assert not is_mounted(str(cleanup))
    # Continued, the daemon finds its mount gone and exits (the fixture checks).
    os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while _daemon_pid(tmp_path) is not None:
        assert time.monotonic() < deadline, "the daemon outlived its lazy unmount"
        time.sleep(0.05)



# ---- answers that never end -----------------------------------------------------------


def test_a_redirect_loop_is_one_line(registry: Registry, tmp_path: Path) -> None:
    """A manifest or blob redirected for ever: one line naming the loop (it was a
    traceback: httpx's TooManyRedirects is not a transport error)."""
    _push(registry, tmp_path, {"config.json": b"{}"})
    with TrickleProxy(registry.url) as proxy:
        for pattern, args in ((r"^GET /v2/.+/manifests/", ["inspect", f"{proxy.host}/g/m:v1"]),
                              (r"^GET /v2/.+/blobs/", ["pull", f"{proxy.host}/g/m:v1",
                                                       str(tmp_path / "out"), "--quiet"])):
            proxy.clear()
            proxy.redirect_loop(pattern)
            result, _ = _cli(tmp_path, *args, "--plain-http", "--timeout", "3", within=3)
            assert "redirected in a loop" in _one_line_error(result)
    assert proxy.redirects >= 20


def test_an_endless_listing_is_refused(registry: Registry, tmp_path: Path) -> None:
    """A tag list whose body never ends, sent fast: `ls` read it for ever (a minute and
    more, memory growing: it moves, so no stall deadline ends it); now refused once it
    passes the size bound of an answer read whole."""
    _push(registry, tmp_path, {"config.json": b"{}"})
    with TrickleProxy(registry.url) as proxy:
        proxy.endless(r"^GET /v2/.+/tags/list")
        result, took = _cli(tmp_path, "ls", f"{proxy.host}/g/m", "--plain-http",
                            "--timeout", "3", within=10)
    assert proxy.endless_sent > 16 << 20  # it did read on, to the bound
    assert "exceeds" in _one_line_error(result)
    assert took < 10, f"ls took {took:.1f}s"


def test_an_endless_harbor_api_page_is_refused(registry: Registry, tmp_path: Path) -> None:
    """The same for a page of Harbor's API (looked for by `ls HOST`): read whole, so
    bounded as any answer read whole."""
    _push(registry, tmp_path, {"config.json": b"{}"})
    with TrickleProxy(registry.url) as proxy:
        proxy.endless(r"^GET /api/v2.0/projects")
        result, took = _cli(tmp_path, "ls", proxy.host, "--plain-http", "--timeout", "3",
                            within=10)
    assert proxy.endless_sent > 16 << 20
    assert "exceeds" in _one_line_error(result)
    assert took < 10, f"ls took {took:.1f}s"


def test_timeouts_that_are_no_number_of_seconds_are_refused(tmp_path: Path) -> None:
    """`--timeout nan` was a traceback (a NaN deadline); `inf` or 1e300 overflow the
    socket timeout of the mount's direct reads. Each is one usage line, at once."""
    for value in ("nan", "inf", "1e300", "0", "-1"):
        result, _ = _cli(tmp_path, "ls", "127.0.0.1:1/g/m", "--plain-http",
                         "--timeout", value, within=5)
        assert "--timeout" in _one_line_error(result), value



@mount
def test_unmount_of_a_path_inside_a_hung_mount_is_bounded(registry: Registry, tmp_path: Path,
                                                          cleanup: Path) -> None:
    """`galleryfs unmount MNT/typo` with the daemon stopped hung for good (the stat of a
    path inside the mount waits on the daemon); now a usage line naming the mount, at
    once, nothing inside it touched."""
    _push(registry, tmp_path, {"a.bin": b"x"})
    _mount(registry.host, cleanup, tmp_path, "--timeout", "3")
    pid = _daemon_pid(tmp_path)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    result, took = _cli(tmp_path, "unmount", str(cleanup / "typo"), within=15)
    assert f"unmount {cleanup}" in _one_line_error(result)
    assert took < 15, f"unmount took {took:.1f}s"
    assert is_mounted(str(cleanup))




def test_the_mount_a_path_lies_inside_is_the_innermost_fuse_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mountpoint in a home folder on sshfs is not "inside" sshfs's mount; a path in
    it is inside it, not inside sshfs's."""
    from galleryfs.mount import unmount
    table = [("/", "ext4"), ("/home/u", "fuse.sshfs"), ("/home/u/models", "fuse.galleryfs"),
             ("/srv", "ext4")]
    monkeypatch.setattr(unmount, "_mounts", lambda: table)
    assert unmount._fuse_mount_above("/home/u/models/g/m") == "/home/u/models"
    assert unmount._fuse_mount_above("/home/u/other") == "/home/u"
    assert unmount._fuse_mount_above("/srv/x") is None
    assert unmount.is_mounted("/home/u/models")  # so never refused as inside /home/u

@mount
def test_sigterm_to_the_daemon_does_not_wait_for_a_stalled_read(registry: Registry,
                                                                tmp_path: Path,
                                                                cleanup: Path) -> None:
    """SIGTERM (systemctl stop, a pod evicted) while a read waits on a frozen registry
    with --timeout 30: the daemon waited for that read's deadline (32 s measured) before
    it unmounted, past a pod's 30 s grace; now it ends the read after a short grace."""
    _push(registry, tmp_path, {"a.bin": os.urandom(3 << 20)})
    _mount(registry.host, cleanup, tmp_path, "--timeout", "30", "--chunk-size", "1M")
    path = cleanup / "g" / "m" / "v1" / "a.bin"
    real = Path(os.path.realpath(path))  # v1 is a link to the revision's folder
    pid = _daemon_pid(tmp_path)
    assert pid is not None
    with frozen(registry):
        reader = subprocess.Popen([sys.executable, "-c",
                                   f"open({str(path)!r}, 'rb').read(4096)"],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not _waiting(reader.pid, real):
                assert time.monotonic() < deadline, "the read never reached the daemon"
                time.sleep(0.05)
            start = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            while _daemon_pid(tmp_path) is not None:
                assert time.monotonic() - start < 15, "the daemon outlived SIGTERM by 15 s"
                time.sleep(0.05)
            assert reader.wait(timeout=10) != 0  # its read failed, it did not hang
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(timeout=10)
    assert not is_mounted(str(cleanup))




def _waiting(pid: int, path: Path) -> bool:
    """The process is inside a read(2) of `path` (blocked on the daemon's answer)."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
        return (fields[0] == "0"  # read, on x86-64
                and os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}") == str(path))
    except (OSError, IndexError, ValueError):
        return False
