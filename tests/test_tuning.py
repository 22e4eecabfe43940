"""The serving process's malloc settings (mount/tuning.py), in a process of their own:
mallopt must run before any thread allocates."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Chunk buffers received in one worker thread, freed in another (as the trio thread
# drops chunks the stream has passed), then received again in the other worker thread
# (trio hands spans to whichever worker thread is idle). The peak RSS must not grow past
# the first round: freed buffers are reused whichever thread asks next.
_SCENARIO = textwrap.dedent("""
    import ctypes, queue, sys, threading
    from galleryfs.mount.tuning import _M_ARENA_MAX, tune_process
    assert tune_process(), "mallopt refused"
    if sys.argv[1:] == ["two-arenas"]:  # the control: what the test must be able to see
        assert ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2) == 1
    from galleryfs.registry.ranges import _unfilled

    CHUNK, BUFFERS, ROUNDS = 4 << 20, 8, 8

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM"))

    def worker(inbox, outbox):
        while inbox.get():
            bufs = []
            for _ in range(BUFFERS):
                buf = _unfilled(CHUNK)
                view = (ctypes.c_char * CHUNK).from_buffer(buf)
                ctypes.memset(ctypes.addressof(view), 1, CHUNK)  # every page touched
                del view
                bufs.append(buf)
            outbox.put(bufs)
            del bufs, buf

    pairs = [(queue.Queue(), queue.Queue()) for _ in range(2)]
    threads = [threading.Thread(target=worker, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    first = None
    for r in range(ROUNDS):
        inbox, outbox = pairs[r % 2]
        inbox.put(True)
        bufs = outbox.get()
        del bufs
        if first is None:
            first = hwm()
    for inbox, _ in pairs:
        inbox.put(False)
    for t in threads:
        t.join()
    print(hwm() - first)
""")


def _grown(*args: str) -> int:
    # Nothing inherited may choose the allocator or its arenas.
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _SCENARIO, *args], capture_output=True,
                         text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_chunk_buffers_freed_in_one_thread_are_reused_by_another() -> None:
    grown = _grown()
    assert grown <= 4 << 20, f"peak RSS grew {grown >> 20} MiB after the first round"
    # The same with two arenas: each thread kept its own freed buffers, and the peak grew
    # by a whole round (32 MiB). Shows the measurement tells the two apart here.
    control = _grown("two-arenas")
    assert control >= 24 << 20, f"with two arenas the peak grew only {control >> 20} MiB"


def test_a_foreground_mount_tunes_the_process_before_its_first_trio_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry check's trio.run may start a worker thread (a name lookup) that the
    serving run reuses: malloc's arena limit holds only for threads started after it."""
    from galleryfs.mount import daemon
    from galleryfs.mount.config import MountConfig
    from galleryfs.registry.client import ClientOptions

    calls: list[str] = []
    monkeypatch.setattr(daemon, "check_fuse", lambda **_: None)
    monkeypatch.setattr(daemon, "check_mountpoint", lambda _: None)
    monkeypatch.setattr(daemon, "tune_process", lambda: calls.append("tune") or True)
    monkeypatch.setattr(daemon.trio, "run", lambda *_: calls.append("trio.run"))
    monkeypatch.setattr(daemon.serve, "run", lambda *_: calls.append("serve"))
    config = MountConfig("localhost:5000", str(tmp_path / "mnt"), ClientOptions(),
                         str(tmp_path / "cache"))
    assert daemon.mount_main(config, foreground=True) == 0
    assert calls[:2] == ["tune", "trio.run"], calls
