"""Running the mount: checks, the trio/pyfuse3 main loop, daemonising, unmounting.

`mount_main` checks its input and the registry in the calling process, so bad input
fails fast with a one-line message. In the background mode it then re-executes
itself (`python -m galleryfs.mount.daemon --child`, the configuration with any credentials on
stdin, never in argv) and returns once the child reports the mount ready on a pipe,
or fails with the tail of the child's log if the child dies first.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from ..errors import GalleryError, UsageError
from ..reference import parse
from ..registry.client import ClientOptions, RegistryClient
from ..registry.credentials import Credentials
from ..registry.ranges import DirectRanges
from ..registry.retry import RetryPolicy
from .diskcache import DiskCache
from .operations import XATTR_FLUSH, Operations
from .reader import DEFAULT_CHUNK, DEFAULT_MEMORY, WINDOW_CAP, ChunkReader
from .sources import RegistrySource
from .tree import Tree
from .writeback import PageCacheFill

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
DEFAULT_READ_AHEAD_KB = 1024
DEFAULT_CACHE_SIZE = 10 << 30
SWITCH_INTERVAL = 0.0005
# Seconds SIGTERM waits for the disk cache's write-behind before unmounting.
SIGNAL_FLUSH_TIMEOUT = 10.0
_M_ARENA_MAX = -8  # glibc malloc.h


@dataclass
class MountConfig:
    source: str
    mountpoint: str
    options: ClientOptions
    cache_dir: str
    cache_size: int = DEFAULT_CACHE_SIZE
    refresh: float = 30.0
    chunk_size: int = DEFAULT_CHUNK
    memory_size: int = DEFAULT_MEMORY
    debug: bool = False
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "galleryfs")


# ---- checks --------------------------------------------------------------------------


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["fusermount3", *args], capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        raise GalleryError("fusermount3 not found: install fuse3") from None


def _dead_mount(mountpoint: str) -> bool:
    """True for a mount left by a daemon that died ("Transport endpoint is not connected").

    statfs always reaches the (dead) connection; a stat or a directory listing may be
    answered from the kernel's caches, so neither tells.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(mountpoint: str) -> None:
    """Refuse what cannot be mounted on; recover a mountpoint left by a dead daemon."""
    try:
        os.stat(mountpoint)
        stale = os.path.ismount(mountpoint) and _dead_mount(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise UsageError(f"mountpoint {mountpoint}: no such directory") from None
        if exc.errno != errno.ENOTCONN:
            raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        stale = True
    if stale:
        print(f"galleryfs: {mountpoint}: cleaning up after a galleryfs that died "
              "(transport endpoint is not connected)", file=sys.stderr)
        _fusermount("-uz", mountpoint)
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not empty")


def _root_repo(source: str) -> tuple[str, str]:
    ref = parse(source)
    if ref.tag or ref.digest:
        raise UsageError("mount takes REGISTRY, REGISTRY/GALLERY or REGISTRY/GALLERY/MODEL "
                         "(no tag or digest)")
    return ref.host, ref.repository


async def _check_registry(config: MountConfig) -> None:
    host, root = _root_repo(config.source)
    async with RegistryClient(host, config.options) as client:
        await client.ping()
        await Tree(RegistrySource(client), root, refresh=config.refresh).check()


# ---- the daemon ----------------------------------------------------------------------


def _bdi_of(mountpoint: str) -> str | None:
    """MAJ:MIN of the mount from /proc/self/mountinfo (stat would wait on ourselves)."""
    target = os.path.realpath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mp = fields[4].encode().decode("unicode_escape")
                if mp == target and " - fuse" in line:
                    found = fields[2]
    except OSError:
        return None
    return found


def _raise_read_ahead(mountpoint: str, kb: int) -> None:
    bdi = _bdi_of(mountpoint)
    if not bdi:
        log.debug("no bdi found for %s; kernel read-ahead left as is", mountpoint)
        return
    try:
        Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").write_text(f"{kb}\n")
        log.debug("read_ahead_kb of %s set to %d", bdi, kb)
    except OSError as exc:
        log.debug("cannot raise read_ahead_kb of %s: %s", bdi, exc)


async def _serve(config: MountConfig, ready_fd: int | None) -> None:
    host, root = _root_repo(config.source)
    async with RegistryClient(host, config.options) as client:
        tree = Tree(RegistrySource(client), root, refresh=config.refresh)
        await tree.check()
        # --cache-size 0: no disk cache. A cold read then writes nothing locally (where the
        # cache shares a disk with the data being read, that write is what bounds it), and
        # every remount fetches again.
        disk = (DiskCache(config.cache_dir, config.cache_size, config.chunk_size)
                if config.cache_size > 0 else None)
        # The memory budget holds the read-ahead window and a chunk, whatever the
        # chunk size (with less, prefetched chunks would be evicted before use).
        memory = max(config.memory_size, WINDOW_CAP + config.chunk_size)
        ranges = DirectRanges(client)
        reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=config.chunk_size,
                             memory_bytes=memory, disk=disk,
                             fetch_timeout=config.options.timeout * 2)

        def counters() -> dict[str, object]:
            return {"registry_bytes": client.bytes_received,
                    "registry_requests": client.requests_sent,
                    "direct_ranges": ranges.stats.direct,
                    "direct_fallbacks": ranges.stats.fallbacks,
                    "listings_prefetched": tree.prefetched_listings}

        # Write-behind (fill.py) needs galleryfs's build of pyfuse3 (notify_retrieve).
        fill = (PageCacheFill(reader, pyfuse3.notify_retrieve)
                if disk is not None and hasattr(pyfuse3, "notify_retrieve") else None)
        if fill is not None:
            reader.defer = fill.owe
        ops = Operations(tree, reader, refresh=config.refresh, counters=counters, fill=fill)
        # A bare "galleryfs" fsname is resolved as a path when the cwd has such a folder.
        options = {f"fsname=galleryfs:{config.source}", "subtype=galleryfs", "ro", "default_permissions"}
        if config.debug:
            options.add("debug")
        pyfuse3.init(ops, config.mountpoint, options)
        try:
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                tree.spawn = nursery
                if fill is not None:
                    await nursery.start(fill.run)
                nursery.start_soon(_watch_signals, fill)
                nursery.start_soon(_announce, config, ready_fd)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            ranges.close()
            if disk is not None:
                disk.close()
    log.info("%s unmounted", config.mountpoint)


async def _watch_signals(fill: PageCacheFill | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            # The page cache goes with the mount: write what the disk cache is owed
            # first, within a grace period's reach.
            if fill is not None and fill.owed and not await fill.flush(SIGNAL_FLUSH_TIMEOUT):
                log.warning("unmounting with %d chunks not written to the disk cache",
                            fill.owed)
            pyfuse3.terminate()
            return


async def _announce(config: MountConfig, ready_fd: int | None) -> None:
    # A stat through the kernel answers only once the FUSE loop serves requests.
    await trio.to_thread.run_sync(os.stat, config.mountpoint)
    _raise_read_ahead(config.mountpoint, config.read_ahead_kb)
    log.info("%s mounted on %s", config.source, config.mountpoint)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        finally:
            os.close(ready_fd)


def _limit_malloc_arenas() -> None:
    """Two glibc malloc arenas instead of one per thread (8 per core).

    Chunk buffers are allocated in fetch threads and freed in others; with an arena per
    thread the freed megabytes stayed spread over arenas, and the daemon's peak RSS
    during one cold read varied from 80 to 190 MiB (scripts/bench G9). Must run before
    the first worker thread starts.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc
        pass


def run_mount(config: MountConfig, ready_fd: int | None = None) -> None:
    """Serve the mount in this process until unmounted or signalled."""
    # The trio thread is busy with FUSE requests and HTTP bodies during a cold read;
    # at the default 5 ms switch interval, a disk cache writer waited up to that long
    # for the GIL after each of its syscalls, and stores fell to a third of the disk's
    # speed. 0.5 ms let them keep up (scripts/bench G1).
    sys.setswitchinterval(SWITCH_INTERVAL)
    _limit_malloc_arenas()
    trio.run(_serve, config, ready_fd)


# ---- entry points --------------------------------------------------------------------


def mount_main(source: str, mountpoint: str, *, foreground: bool, options: ClientOptions,
               cache_dir: str | None, cache_size: int, refresh: float, chunk_size: int,
               debug: bool, ready_fd: int | None = None) -> int:
    if refresh < 0:
        raise UsageError("--refresh must not be negative")
    if chunk_size < 4096 or chunk_size > 256 << 20:
        raise UsageError("--chunk-size must be between 4K and 256M")
    mountpoint = os.path.abspath(mountpoint)
    config = MountConfig(source, mountpoint, options, cache_dir or default_cache_dir(),
                         cache_size, refresh, chunk_size, debug=debug)
    check_mountpoint(mountpoint)
    Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
    trio.run(_check_registry, config)
    if foreground:
        run_mount(config, ready_fd)
        return 0
    return _spawn(config)


def _log_path(config: MountConfig) -> Path:
    name = config.mountpoint.strip("/").replace("/", "_") or "root"
    path = Path(config.cache_dir) / "logs" / f"mount-{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _spawn(config: MountConfig) -> int:
    log_path = _log_path(config)
    read_fd, write_fd = os.pipe()
    payload = json.dumps(_config_to_json(config)).encode()
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "galleryfs.mount.daemon", "--child", str(write_fd)],
            stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
            pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    try:
        assert child.stdin is not None
        child.stdin.write(payload)
        child.stdin.close()
        deadline = time.monotonic() + READY_TIMEOUT
        got = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], deadline - time.monotonic())
            if not ready:
                break
            piece = os.read(read_fd, 64)
            if not piece:
                break  # the child closed the pipe: it died (or wrote "ready" before)
            got += piece
            if b"ready" in got:
                return 0
    finally:
        os.close(read_fd)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
    tail = _tail(log_path)
    raise GalleryError(f"the mount did not come up; log {log_path}:\n{tail}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _config_to_json(config: MountConfig) -> dict:
    out = dataclasses.asdict(config)
    opts = config.options
    out["options"] = {
        "plain_http": opts.plain_http, "ca_file": opts.ca_file, "insecure": opts.insecure,
        "timeout": opts.timeout,
        "credentials": (dataclasses.asdict(opts.credentials) if opts.credentials else None),
        "retry": dataclasses.asdict(opts.retry) if opts.retry else None,
    }
    return out


def _config_from_json(data: dict) -> MountConfig:
    o = data.pop("options")
    options = ClientOptions(
        plain_http=o["plain_http"], ca_file=o["ca_file"], insecure=o["insecure"],
        timeout=o["timeout"],
        credentials=Credentials(**o["credentials"]) if o["credentials"] else None,
        retry=RetryPolicy(**o["retry"]) if o["retry"] else None)
    return MountConfig(options=options, **data)


def _flush(mountpoint: str) -> None:
    """Have the daemon write what its disk cache is owed (fill.py) before the page cache
    it comes from goes with the mount. Best effort: another daemon may not know it."""
    try:
        answer = json.loads(os.getxattr(mountpoint, XATTR_FLUSH))
    except (OSError, ValueError) as exc:
        log.debug("%s: no flush: %s", mountpoint, exc)
        return
    if not answer.get("done", True):
        print(f"galleryfs: {mountpoint}: {answer.get('owed')} chunks were not written to the "
              "disk cache in time; they will be fetched again when read", file=sys.stderr)


def unmount_main(mountpoint: str, *, lazy: bool = False) -> int:
    mountpoint = os.path.abspath(mountpoint)
    try:
        os.stat(mountpoint)
        mounted = os.path.ismount(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UsageError(f"{mountpoint}: {exc.strerror}") from None
        mounted = True
    if not mounted:
        raise UsageError(f"{mountpoint} is not mounted")
    if _dead_mount(mountpoint):
        lazy = True  # the daemon is gone; only a lazy unmount clears the entry
    else:
        _flush(mountpoint)
    result = _fusermount("-uz" if lazy else "-u", mountpoint)
    if result.returncode != 0:
        message = result.stderr.strip() or f"fusermount3 exited with {result.returncode}"
        if "busy" in message.lower():
            raise GalleryError(f"{mountpoint} is busy: a process has files or its working "
                               "directory there; close them and unmount again")
        raise GalleryError(f"cannot unmount {mountpoint}: {message}")
    return 0


# ---- `python -m galleryfs.mount.daemon`: the daemon child, and a stand-alone runner ------------


def _main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        config = _config_from_json(json.loads(sys.stdin.read()))
        _setup_logging(config.debug)
        try:
            run_mount(config, int(args[1]))
        except GalleryError as exc:
            log.error("%s", exc)
            return exc.exit_code
        return 0
    parser = argparse.ArgumentParser(prog="python -m galleryfs.mount.daemon")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-f", "--foreground", action="store_true")
    parser.add_argument("--plain-http", action="store_true")
    parser.add_argument("--ca-file")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--cache-dir")
    parser.add_argument("--cache-size", type=int, default=DEFAULT_CACHE_SIZE)
    parser.add_argument("--refresh", type=float, default=30.0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--debug", action="store_true")
    ns = parser.parse_args(args)
    _setup_logging(ns.debug)
    options = ClientOptions(plain_http=ns.plain_http, ca_file=ns.ca_file, timeout=ns.timeout)
    try:
        return mount_main(ns.source, ns.mountpoint, foreground=ns.foreground, options=options,
                          cache_dir=ns.cache_dir, cache_size=ns.cache_size,
                          refresh=ns.refresh, chunk_size=ns.chunk_size, debug=ns.debug)
    except GalleryError as exc:
        print(f"galleryfs: {exc}", file=sys.stderr)
        return exc.exit_code


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s galleryfs: %(levelname)s: %(name)s: %(message)s")
    if not debug:
        logging.getLogger("httpx").setLevel(logging.WARNING)


if __name__ == "__main__":
    raise SystemExit(_main())
