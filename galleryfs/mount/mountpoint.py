"""The mountpoint as the kernel sees it: fit to mount on, left by a dead daemon, fusermount3."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

from ..errors import GalleryError, UsageError


def fusermount(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """fusermount3, killed after `timeout` (it may stat a mount whose daemon hangs):
    then an answer with return code -1."""
    command = ["fusermount3", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise GalleryError("fusermount3 not found: install fuse3") from None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, -1, "",
                                           f"fusermount3 did not finish within {timeout:g}s")


def check_fuse(*, allow_other: bool = False, device: str = "/dev/fuse",
               fuse_conf: str = "/etc/fuse.conf") -> None:
    """What the kernel side of a mount needs, each said in one line before a child starts."""
    try:
        os.close(os.open(device, os.O_RDWR))
    except OSError as exc:
        raise GalleryError(
            f"cannot use {device} ({exc.strerror}): load the fuse module (`modprobe fuse`); "
            "in a container, run it with --device /dev/fuse --cap-add SYS_ADMIN") from None
    if shutil.which("fusermount3") is None:
        raise GalleryError("fusermount3 not found: install fuse3 (`apt install fuse3`)")
    if allow_other and os.geteuid() != 0 and not _user_allow_other(fuse_conf):
        raise GalleryError(f"--allow-other needs `user_allow_other` in {fuse_conf} "
                           "(or mount as root)")


def _user_allow_other(fuse_conf: str) -> bool:
    try:
        with open(fuse_conf) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def is_dead(mountpoint: str) -> bool:
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
        stale = os.path.ismount(mountpoint) and is_dead(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise UsageError(f"mountpoint {mountpoint}: no such directory") from None
        if exc.errno != errno.ENOTCONN:
            raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        stale = True
    if stale:
        print(f"galleryfs: {mountpoint}: cleaning up after a galleryfs that died "
              "(transport endpoint is not connected)", file=sys.stderr)
        fusermount("-uz", mountpoint)
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not empty")
