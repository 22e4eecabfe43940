"""Process and kernel settings that the mount daemon's throughput depends on.

Each one was measured (scripts/bench, or one-off runs where said); the comments give
the figures each choice rests on, the README's Performance section the runs behind them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The trio thread is busy with FUSE requests and HTTP bodies during a cold read; a thread
# that made a blocking call (a disk cache write, a range read) then waits for the GIL up
# to the switch interval. At the default 5 ms such threads fell far behind; 0.5 ms let
# them keep up (scripts/bench G1).
SWITCH_INTERVAL = 0.0005
# The mount's read_ahead_kb (128 KiB by default) is both the size of the requests
# buffered reads reach FUSE in and the read-around of an mmap fault (the pages around a
# faulting one, then read-ahead as the faults move on). Large requests cost fewer round
# trips per byte, but one tensor read through mmap (safetensors' get_tensor of 0.6 MB,
# scripts/bench P3) made the kernel ask for 3.6 MiB around it and its header at 1 MiB,
# 2.0 MiB at 512 KiB, 1.3 MiB at 256 KiB. 512 KiB is what that costs sequential reads, in
# one-off runs: a cold read 11-17% slower than at 1 MiB (the daemon hashes every byte on
# two cores that the registry and the reader share, and it gets twice the requests); a
# remount's read of a full disk cache 9-11% slower, with a tenth more daemon CPU per byte
# (README: "Where the rest of G1's and G4's gaps are").
READ_AHEAD_KB = 512
# glibc malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Chunk buffers (4 MiB, a few dozen alive) come from the heap rather than from mmap, and
# freed ones stay there for the next: a fresh mapping per buffer cost a page fault and a
# zeroed page per 4 KiB (a cold read of 1 GiB took ~100,000 faults, ~0.5 s of system CPU;
# ~11,000 with these). 32 MiB is glibc's largest mmap threshold; the trim threshold keeps
# the read-ahead window's worth of freed buffers.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


def tune_process() -> bool:
    """Settings for the serving process; before its first worker thread starts. Returns
    whether malloc took its settings (not with another allocator preloaded)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    return _tune_malloc()


def _tune_malloc() -> bool:
    """One glibc malloc arena for every thread instead of one per thread (8 per core),
    and chunk buffers reused from the heap (MMAP_THRESHOLD).

    Chunk buffers are received in worker threads and freed in the trio thread; a freed
    buffer goes back to the arena it came from, reusable only by that arena's threads, and
    a stream's next request may go to a worker thread of the other arena. With an arena
    per thread the freed megabytes stayed spread over arenas and the daemon's peak RSS
    during one cold read varied widely. With two, a cold read of 1 GiB still peaked at
    78-86 MiB where 64-65 were ever alive at once (measured with every chunk buffer its own
    mapping), and at 66-70 with one (one-off runs, alternating; scripts/bench G9 67-79 with
    one arena, 70.8-75.3 with two chunks ahead too: README, Performance).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    except (OSError, AttributeError):  # not glibc
        done = []
    if done != [1, 1, 1]:  # glibc's mallopt returns 1 when it took the setting
        log.debug("malloc did not take galleryfs's settings (%s): peak RSS may be higher",
                  done or "no glibc mallopt")
        return False
    return True


def raise_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Set the mount's kernel read-ahead; best effort (it needs root)."""
    bdi = _bdi_of(mountpoint)
    if not bdi:
        log.debug("no bdi found for %s; kernel read-ahead left as is", mountpoint)
        return
    try:
        Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").write_text(f"{kb}\n")
        log.debug("read_ahead_kb of %s set to %d", bdi, kb)
    except OSError as exc:
        log.debug("cannot raise read_ahead_kb of %s: %s", bdi, exc)


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
