"""The serving process's malloc settings (mount/tuning.py), in a process of their own:
mallopt must run before any thread allocates."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Chunk buffers received in one worker thread, freed in another (as the trio thread
# drops chunks the stream has passed), then received again in the other worker thread
# (trio hands spans to whichever worker thread is idle). The peak RSS must not grow past
# the first round: freed buffers are reused whichever thread asks next.
_SCENARIO = textwrap.dedent("""
    import ctypes, queue, threading
    from galleryfs.mount.tuning import tune_process
    tune_process()
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


def test_chunk_buffers_freed_in_one_thread_are_reused_by_another() -> None:
    out = subprocess.run([sys.executable, "-c", _SCENARIO], capture_output=True, text=True,
                         timeout=120, check=True)
    grown = int(out.stdout)
    # With an arena per worker thread (or two arenas) each thread kept its own freed
    # buffers, and the peak grew by a whole round (32 MiB).
    assert grown <= 4 << 20, f"peak RSS grew {grown >> 20} MiB after the first round"
