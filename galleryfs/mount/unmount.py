"""`galleryfs unmount`: have the daemon write what its disk cache is owed, then unmount."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys

from ..errors import GalleryError, UsageError
from .mountpoint import fusermount, is_dead
from .xattrs import FLUSH as XATTR_FLUSH

log = logging.getLogger(__name__)


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
    if is_dead(mountpoint):
        lazy = True  # the daemon is gone; only a lazy unmount clears the entry
    else:
        _flush(mountpoint)
    result = fusermount("-uz" if lazy else "-u", mountpoint)
    if result.returncode != 0:
        message = result.stderr.strip() or f"fusermount3 exited with {result.returncode}"
        if "busy" in message.lower():
            raise GalleryError(f"{mountpoint} is busy: a process has files or its working "
                               "directory there; close them and unmount again")
        raise GalleryError(f"cannot unmount {mountpoint}: {message}")
    return 0


def _flush(mountpoint: str) -> None:
    """Have the daemon write what its disk cache is owed (writeback.py) before the page
    cache it comes from goes with the mount. Best effort: another daemon may not know it."""
    try:
        answer = json.loads(os.getxattr(mountpoint, XATTR_FLUSH))
    except (OSError, ValueError) as exc:
        log.debug("%s: no flush: %s", mountpoint, exc)
        return
    if not answer.get("done", True):
        print(f"galleryfs: {mountpoint}: {answer.get('owed')} chunks were not written to the "
              "disk cache in time; they will be fetched again when read", file=sys.stderr)
