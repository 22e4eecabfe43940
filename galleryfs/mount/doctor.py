"""`galleryfs doctor`: what a mount needs from this machine and from a registry, each
checked on its own and said with what to do about it.

A mount that fails says why in one line; doctor is for before that, on a new node: it
looks at everything at once, so one run lists every fix. Nothing here changes the
machine. pyfuse3 is looked at, never imported for use, so doctor runs where it is broken.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import stat
import time
from dataclasses import dataclass

from ..errors import AuthError, GalleryError
from ..registry.client import RegistryClient
from .requirements import require_patched_pyfuse3

OK = "ok"
WARN = "warn"
FAIL = "FAIL"
# Bearer tokens and TLS certificates carry validity times: a node whose clock is off by
# more than this sees tokens that expired before they arrived.
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class Check:
    name: str
    state: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""


def local_checks() -> list[Check]:
    """FUSE on this machine: device, helper, kernel, pyfuse3 build."""
    return [_dev_fuse(), _fusermount(), _kernel(), _pyfuse3(), _allow_other()]


def _dev_fuse() -> Check:
    name = "fuse device"
    fix = ("load the module (`modprobe fuse`); in a container, add `--device /dev/fuse "
           "--cap-add SYS_ADMIN`")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except FileNotFoundError:
        return Check(name, FAIL, "/dev/fuse does not exist", fix)
    except OSError as exc:
        return Check(name, FAIL, f"/dev/fuse cannot be opened: {exc.strerror}",
                     "run as a user allowed to use /dev/fuse (mode 0666 on most systems)")
    os.close(fd)
    return Check(name, OK, "/dev/fuse can be opened for reading and writing")


def _fusermount() -> Check:
    name = "fusermount3"
    path = shutil.which("fusermount3")
    if path is None:
        return Check(name, FAIL, "fusermount3 is not on PATH",
                     "install the fuse3 package (`apt install fuse3`)")
    if os.geteuid() != 0 and not os.stat(path).st_mode & stat.S_ISUID:
        return Check(name, FAIL, f"{path} is not setuid root: a user cannot mount with it",
                     f"`chmod u+s {path}`, or mount as root")
    return Check(name, OK, path)


def _kernel() -> Check:
    name = "kernel FUSE"
    try:
        with open("/proc/filesystems") as f:
            known = {line.split()[-1] for line in f if line.strip()}
    except OSError as exc:
        return Check(name, WARN, f"cannot read /proc/filesystems: {exc.strerror}")
    release = os.uname().release
    if "fuse" not in known:
        return Check(name, FAIL, f"kernel {release} has no fuse file system loaded",
                     "`modprobe fuse`")
    return Check(name, OK, f"kernel {release} knows the fuse file system")


def _pyfuse3() -> Check:
    try:
        require_patched_pyfuse3()
    except GalleryError as exc:
        return Check("pyfuse3", FAIL, str(exc).split(": ", 1)[-1],
                     "run scripts/setup in the galleryfs source tree")
    return Check("pyfuse3", OK, "galleryfs's build")


def _allow_other() -> Check:
    # Only matters to a non-root user mounting with -o allow_other; worth saying up front.
    name = "allow_other"
    try:
        with open("/etc/fuse.conf") as f:
            allowed = any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        allowed = False
    if allowed or os.geteuid() == 0:
        return Check(name, OK, "a mount may let other users read it")
    return Check(name, WARN, "/etc/fuse.conf lacks user_allow_other: only root can mount "
                 "for other users", "add `user_allow_other` to /etc/fuse.conf if you need it")


async def registry_checks(client: RegistryClient, credentials: bool) -> list[Check]:
    """Reachability, TLS, credentials and clock against one registry."""
    name = f"registry {client.host}"
    started = time.time()
    try:
        date = await client.ping()
    except AuthError as exc:
        fix = ("check the user name and password (`galleryfs login`)" if credentials else
               f"`galleryfs login {client.host}`, or --username with --password-stdin")
        return [Check(name, OK, "reachable"), Check("credentials", FAIL, str(exc), fix)]
    except GalleryError as exc:
        return [Check(name, FAIL, str(exc), _reach_fix(str(exc)))]
    checks = [Check(name, OK, f"answers the registry API over "
                    f"{'HTTP' if client.options.plain_http else 'verified TLS'}")]
    checks.append(Check("credentials", OK, "accepted" if credentials else
                        "none needed for /v2/ (none stored or given)"))
    checks.append(_clock(date, (started + time.time()) / 2))
    return checks


def _reach_fix(message: str) -> str:
    if "--ca-file" in message or "--plain-http" in message:
        return "see the message"
    return "check the host and port, the network path and any proxy"


def _clock(date: str | None, local: float) -> Check:
    name = "clock"
    if not date:
        return Check(name, WARN, "the registry sent no Date header to compare with")
    try:
        remote = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return Check(name, WARN, f"the registry's Date header {date!r} is not a date")
    skew = local - remote
    if abs(skew) > CLOCK_SKEW:
        return Check(name, FAIL, f"this machine's clock is {abs(skew):.0f} s "
                     f"{'ahead of' if skew > 0 else 'behind'} the registry's",
                     "synchronise the clock (NTP): tokens and certificates depend on it")
    return Check(name, OK, f"within {CLOCK_SKEW:.0f} s of the registry's")
