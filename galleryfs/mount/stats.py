"""`galleryfs stats`: a running mount's counters, read from its stats attribute on the
mount root (no pyfuse3 needed, so it works beside any build)."""

from __future__ import annotations

import errno
import json
import os

from ..errors import GalleryError, UsageError
from .xattrs import STATS


def read_stats(mountpoint: str) -> dict[str, object]:
    path = os.path.abspath(mountpoint)
    try:
        raw = os.getxattr(path, STATS)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise GalleryError(f"{path}: the galleryfs daemon is gone; `galleryfs unmount "
                               f"{path}` clears it, then mount again") from None
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise UsageError(f"{path} is not the root of a galleryfs mount") from None
        raise GalleryError(f"{path}: cannot read the mount's counters: {exc.strerror}") from None
    try:
        counters = json.loads(raw)
    except ValueError:
        counters = None
    if not isinstance(counters, dict):
        raise GalleryError(f"{path}: the mount's counters are not a JSON object")
    return counters
