"""`galleryfs mount`: check, then serve in the foreground or start the daemon child.

`mount_main` checks the mountpoint and the registry in the calling process, so bad input
fails fast with a one-line message. In the foreground it then serves itself. Otherwise it
starts `python -m galleryfs.mount.daemon --child FD` in a new session, with the
configuration (and any credentials) as JSON on stdin, never in argv, and returns once the
child writes "ready" on the pipe FD, or fails with the tail of the child's log if the child
dies first.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import trio

from ..errors import GalleryError
from . import serve
from .config import MountConfig
from .mountpoint import check_fuse, check_mountpoint
from .tuning import tune_process

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0


def mount_main(config: MountConfig, *, foreground: bool) -> int:
    check_fuse(allow_other=config.allow_other)
    check_mountpoint(config.mountpoint)
    Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
    if foreground:
        # This process serves: tuned before the check's trio.run, as trio keeps its
        # worker threads (a name lookup's) for the serving run, and malloc settings apply
        # to threads started after them.
        tune_process()
    trio.run(serve.check_registry, config)
    if foreground:
        # The CLI's logging stays: warnings only, or everything with --debug.
        serve.run(config)
        return 0
    return _spawn(config)


def setup_logging(debug: bool) -> None:
    """Logging of the background child, into its log file."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s galleryfs: %(levelname)s: %(name)s: %(message)s",
        force=True)
    if not debug:
        logging.getLogger("httpx").setLevel(logging.WARNING)


# ---- the background child ------------------------------------------------------------


def _spawn(config: MountConfig) -> int:
    log_path = _log_path(config)
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "galleryfs.mount.daemon", "--child", str(write_fd)],
            stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
            pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    try:
        assert child.stdin is not None
        child.stdin.write(config.to_json().encode())
        child.stdin.close()
        if _wait_ready(read_fd):
            return 0
    finally:
        os.close(read_fd)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
    raise GalleryError(f"the mount did not come up: {_last_error(log_path)} (log: {log_path})")


def _wait_ready(read_fd: int) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    got = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], deadline - time.monotonic())
        if not ready:
            return False
        piece = os.read(read_fd, 64)
        if not piece:
            return False  # the child closed the pipe: it died
        got += piece
        if b"ready" in got:
            return True
    return False


def _log_path(config: MountConfig) -> Path:
    name = config.mountpoint.strip("/").replace("/", "_") or "root"
    path = Path(config.cache_dir) / "logs" / f"mount-{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _last_error(path: Path, lines: int = 40) -> str:
    """The child's last error line: what the user needs, without a traceback's frames."""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "no log"
    for line in reversed(tail):
        if ": ERROR: " in line:
            return line.split(": ERROR: ", 1)[1].split(": ", 1)[-1].strip()
    for line in reversed(tail):  # a crash: its exception is the last line of the traceback
        if line.strip() and not line.startswith(" "):
            return line.strip()
    return "the daemon exited without a word"


def child_main(argv: list[str]) -> int:
    """`python -m galleryfs.mount.daemon --child FD`: serve the configuration on stdin."""
    if len(argv) != 2 or argv[0] != "--child":
        print("galleryfs.mount.daemon is started by `galleryfs mount`; "
              "run that instead (-f for the foreground)", file=sys.stderr)
        return 2
    config = MountConfig.from_json(sys.stdin.read())
    setup_logging(config.debug)
    tune_process()  # before any thread starts
    try:
        serve.run(config, int(argv[1]))
    except GalleryError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
