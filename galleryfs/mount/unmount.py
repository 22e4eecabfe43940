"""`galleryfs unmount`: have the daemon write what its disk cache is owed, then unmount.

Within `UNMOUNT_WITHIN` seconds, whatever the registry or the daemon does: the daemon's
flush takes from the page cache only, for `UNMOUNT_FLUSH` seconds at most (writeback.py);
a daemon that does not answer in time (stopped, hung) is unmounted lazily; fusermount3
is bounded too. Nothing here touches the mount before the daemon answered (a stat of a
hung mount blocks): whether it is mounted comes from /proc/self/mountinfo, and the one
request (the flush xattr) is sent from a thread that is left behind if it never returns.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import threading

from ..errors import GalleryError, UsageError
from .mountpoint import fusermount
from .writeback import UNMOUNT_FLUSH
from .xattrs import FLUSH as XATTR_FLUSH

log = logging.getLogger(__name__)

# Seconds the daemon has to answer the flush: its flush and a margin.
ANSWER_WAIT = UNMOUNT_FLUSH + 3.0
# Seconds for each fusermount3 run (two at most: plain, then lazy).
FUSERMOUNT_WAIT = 2.5
UNMOUNT_WITHIN = ANSWER_WAIT + 2 * FUSERMOUNT_WAIT + 1.0
assert UNMOUNT_WITHIN <= 15.0

_OK, _DEAD, _HUNG = "ok", "dead", "hung"


def unmount_main(mountpoint: str, *, lazy: bool = False) -> int:
    # Before any stat: a path inside a FUSE mount whose daemon hangs blocks for good.
    # (A mountpoint itself may lie in another FUSE mount, a home folder on sshfs.)
    path = os.path.abspath(mountpoint)
    outer = None if is_mounted(path) else _fuse_mount_above(path)
    if outer is not None:
        raise UsageError(f"{mountpoint} is inside the mount {outer}: unmount {outer}")
    mountpoint = _mountpoint_path(mountpoint)
    if not is_mounted(mountpoint):
        try:
            os.stat(mountpoint)  # not a mount: nothing of ours to block on
        except OSError as exc:
            raise UsageError(f"{mountpoint}: {exc.strerror}") from None
        raise UsageError(f"{mountpoint} is not mounted")
    state = _flush(mountpoint)
    if state == _DEAD:
        lazy = True  # the daemon is gone; only a lazy unmount clears the entry
    elif state == _HUNG:
        lazy = True
        print(f"galleryfs: {mountpoint}: the mount's daemon did not answer within "
              f"{ANSWER_WAIT:g}s (stopped or hung): unmounting lazily; what its disk cache "
              "was owed is not cached, and its process is left running: stop it with kill",
              file=sys.stderr)
    result = fusermount("-uz" if lazy else "-u", mountpoint, timeout=FUSERMOUNT_WAIT)
    if result.returncode == -1 and not lazy:
        # fusermount3 blocked on the mount itself (its daemon stopped answering since).
        print(f"galleryfs: {mountpoint}: {result.stderr}; unmounting lazily", file=sys.stderr)
        result = fusermount("-uz", mountpoint, timeout=FUSERMOUNT_WAIT)
    if result.returncode != 0:
        message = result.stderr.strip() or f"fusermount3 exited with {result.returncode}"
        if "busy" in message.lower():
            raise GalleryError(f"{mountpoint} is busy: a process has files or its working "
                               "directory there; close them and unmount again")
        raise GalleryError(f"cannot unmount {mountpoint}: {message}")
    return 0


def _mountpoint_path(mountpoint: str) -> str:
    """The absolute path, symlinks in its parents resolved, without touching the
    mountpoint itself."""
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def is_mounted(mountpoint: str) -> bool:
    """Whether a filesystem is mounted there, from the kernel's table (no stat)."""
    mounts = _mounts()
    if mounts is None:  # pragma: no cover - no /proc: ask the mount itself
        return os.path.ismount(mountpoint)
    return any(point == mountpoint for point, _ in mounts)


def _fuse_mount_above(path: str) -> str | None:
    """The innermost FUSE mount `path` lies strictly inside, if any (from the
    kernel's table)."""
    above = [point for point, fstype in _mounts() or []
             if fstype.startswith("fuse") and path.startswith(point.rstrip("/") + "/")]
    return max(above, key=len, default=None)


def _mounts() -> list[tuple[str, str]] | None:
    """(mountpoint, filesystem type) of each mount in /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:  # pragma: no cover
        return None
    mounts = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            # The filesystem type follows the " - " that ends the optional fields.
            rest = fields[fields.index("-", 6) + 1:] if "-" in fields[6:] else []
            mounts.append((_unescape(fields[4]), rest[0] if rest else ""))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \\ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _flush(mountpoint: str) -> str:
    """Have the daemon write what its disk cache is owed (writeback.py) before the page
    cache it comes from goes with the mount. Best effort: another daemon may not know
    it. `_DEAD` for a daemon that is gone, `_HUNG` for one that did not answer."""
    box: dict[str, object] = {}

    def ask() -> None:
        try:
            box["answer"] = os.getxattr(mountpoint, XATTR_FLUSH)
        except OSError as exc:
            box["error"] = exc

    # A daemon thread: if the daemon never answers, it is left blocked (the request is
    # dropped when the mount goes, or with this process).
    asker = threading.Thread(target=ask, name="galleryfs-unmount-flush", daemon=True)
    asker.start()
    asker.join(ANSWER_WAIT)
    if asker.is_alive():
        return _HUNG
    error = box.get("error")
    if isinstance(error, OSError):
        if error.errno == errno.ENOTCONN:
            return _DEAD
        log.debug("%s: no flush: %s", mountpoint, error)
        return _OK
    try:
        answer = json.loads(box["answer"])  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        log.debug("%s: no flush: %s", mountpoint, exc)
        return _OK
    owed = answer.get("owed") if isinstance(answer, dict) else None
    if isinstance(owed, int) and owed > 0:
        why = ("in time" if not answer.get("done", True)
               else "(gone from the page cache)")
        print(f"galleryfs: {mountpoint}: {owed} chunks were not written to the disk cache "
              f"{why}; they will be fetched again when read", file=sys.stderr)
    return _OK
