"""`galleryfs warm PATH...`: fill a mount's disk cache ahead of need (node start-up).

Each file is warmed by its daemon (the `WARM` attribute, xattrs.py): the daemon fetches
the chunks its disk cache lacks, verifies them and writes them, without the page cache
in between, so a file larger than memory costs its bytes once. Here: which files, how
many at once, progress and a summary. No pyfuse3: it runs beside any build.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from ..errors import UsageError
from .xattrs import STATS, WARM


@dataclass
class Summary:
    files: int = 0
    bytes: int = 0  # the files' sizes
    fetched_bytes: int = 0  # what came from the registry for them
    cached_chunks: int = 0  # chunks that were on disk already
    failed: list[str] = field(default_factory=list)  # "path: reason"


def files_under(paths: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every galleryfs file named or under a named folder, once each.

    A tag is a symlink to its revision: named, it is followed; met inside a folder, it is
    not (the revision folder beside it has the same files).
    """
    seen: set[tuple[int, int]] = set()
    out: list[tuple[str, int]] = []
    for given in paths:
        path = os.path.realpath(given)
        if not os.path.exists(path):
            raise UsageError(f"{given}: no such file or folder")
        if not _in_galleryfs(path):
            raise UsageError(f"{given} is not in a galleryfs mount")
        for file in _walk(path):
            st = os.stat(file)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                out.append((file, st.st_size))
    return out


def _walk(path: str) -> Iterator[str]:
    if not os.path.isdir(path):
        yield path
        return
    for folder, _dirs, names in os.walk(path):
        for name in sorted(names):
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                yield file


def _mount_of(path: str) -> str:
    mount = path
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    return mount


def check_room(files: list[tuple[str, int]]) -> None:
    """UsageError when the files outgrow their mount's disk cache: the last would evict
    the first, every byte fetched for a cache that keeps only the tail, and the summary
    would still say warmed. (--cache-size 0 is said per file by the daemon.)"""
    need: dict[str, int] = {}
    for path, size in files:
        mount = _mount_of(path)
        need[mount] = need.get(mount, 0) + size
    for mount, total in need.items():
        try:
            limit = json.loads(os.getxattr(mount, STATS)).get("disk_limit")
        except (OSError, ValueError, AttributeError):
            continue  # the daemon says what it can when asked per file
        if isinstance(limit, int) and 0 < limit < total:
            raise UsageError(f"{total} bytes to warm, but the disk cache of {mount} holds "
                             f"{limit} (--cache-size): warm fewer files or mount with a "
                             "larger cache")


def _in_galleryfs(path: str) -> bool:
    """True below a galleryfs mount: its files and revision folders carry a digest, and
    its mount's fsname says galleryfs."""
    mount = _mount_of(path)
    try:
        with open("/proc/self/mounts") as f:
            types = {line.split()[1]: line.split()[2] for line in f if len(line.split()) > 2}
    except OSError:
        return False
    # The kernel writes these four as octal escapes in /proc/self/mounts (backslash first).
    for char in "\\ \t\n":
        mount = mount.replace(char, f"\\{ord(char):03o}")
    return types.get(mount) == "fuse.galleryfs"


def warm_one(path: str) -> dict[str, int]:
    try:
        return json.loads(os.getxattr(path, WARM))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(exc.errno, "the mount keeps nothing on disk (--cache-size 0)") from None
        if exc.errno == errno.ENODATA:  # a daemon that does not know WARM: an older one
            raise OSError(exc.errno, "this mount's galleryfs cannot warm files") from None
        raise


def warm(files: list[tuple[str, int]], jobs: int, progress: Callable[[int], None]) -> Summary:
    summary = Summary()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(warm_one, path): (path, size) for path, size in files}
        for future in as_completed(futures):
            path, size = futures[future]
            progress(size)
            try:
                answer = future.result()
            except OSError as exc:
                summary.failed.append(f"{path}: {exc.strerror or exc}")
                continue
            summary.files += 1
            summary.bytes += size
            summary.fetched_bytes += int(answer.get("bytes", 0))
            summary.cached_chunks += int(answer.get("cached", 0))
    return summary
