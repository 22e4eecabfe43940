"""The write-behind through a real mount and the kernel's real page cache: pages the
kernel dropped between the read and the fill cost no second fetch (issue 15, P1)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from galleryfs.modelpack import ChunkTable
from tests.mounting import fuse_available
from tests.registry_harness import Registry
from tests.test_integrity import push_revision
from tests.test_mount import start_foreground, stats, unmount, wait_for_mount

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")]

MiB = 1 << 20
CHUNK = MiB
SIZE = 12 * MiB + 4321  # 13 chunks of --chunk-size 1M
SETTLE = 30.0  # s: a bound on the fill, which starts 0.5 s after the last fetch


def settled(mnt: Path) -> dict:
    """The stats once the write-behind has nothing owed and the registry bytes stopped
    moving (bounded)."""
    deadline = time.monotonic() + SETTLE
    last: dict | None = None
    while True:
        got = stats(mnt)
        if got["fill_owed"] == 0 and last is not None and \
                got["registry_bytes"] == last["registry_bytes"] and \
                got["fill_chunks"] + got["fill_dropped"] == last["fill_chunks"] + last["fill_dropped"]:
            return got
        assert time.monotonic() < deadline, f"the write-behind did not settle: {got}"
        last = got
        time.sleep(0.2)


def test_pages_dropped_before_the_fill_are_not_fetched_again(registry: Registry,
                                                             tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    # With a chunk table: no whole-blob pass first, each chunk is verified on its own.
    push_revision(registry, "fill/dropped", "v1", data, table=ChunkTable.of_bytes(data, CHUNK))
    blob = hashlib.sha256(data).hexdigest()
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "log"
    mnt.mkdir()
    path = mnt / "fill" / "dropped" / "v1" / "weights.bin"
    proc = start_foreground(registry.host, mnt, cache, log, "--chunk-size", "1M")
    try:
        wait_for_mount(proc, mnt, log)
        os.stat(path)
        before = stats(mnt)
        with open(path, "rb") as f:
            assert f.read() == data
            # The kernel forgets the file's pages before the fill can ask for them, as
            # memory pressure (or DAMON on these VMs) does.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        got = settled(mnt)
        chunks = -(-SIZE // CHUNK)
        # Every byte of the file fetched once; filling the cache fetched nothing more
        # (it fetched the dropped chunks again before: up to 2× the file's bytes).
        assert got["registry_bytes"] - before["registry_bytes"] == SIZE, got
        assert got["derived_bytes"] == 0
        # What the memory cache still held went to disk; the rest is counted, not cached.
        assert got["fill_dropped"] >= 1 and got["fill_missed"] == 0
        assert got["fill_chunks"] + got["fill_dropped"] == chunks, got
        assert got["fill_chunks"] == got["fill_from_memory"]
        assert not (cache / "blobs" / "sha256" / blob).exists()
        # `galleryfs warm` fills the cache on purpose: it fetches the missing chunks only.
        warmed = json.loads(os.getxattr(path, "user.galleryfs.warm"))
        assert warmed["fetched"] == got["fill_dropped"]
        assert warmed["cached"] == got["fill_chunks"]
        assert (cache / "blobs" / "sha256" / blob).exists()
        assert stats(mnt)["registry_bytes"] == got["registry_bytes"] + warmed["bytes"]
    finally:
        unmount(mnt, proc)
