"""The composition root: build the mount's parts from a `MountConfig` and serve it.

The registry client, the tree, the caches, the chunk reader, the write-behind and the
FUSE `Operations` are made here and handed to each other; none of them builds another.
`run` serves in the calling process (foreground, or the daemon child) until unmounted
or signalled.
"""

from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from ..errors import GalleryError
from ..registry.client import RegistryClient
from ..registry.mirrorranges import MirroredRanges
from ..registry.ranges import DirectRanges
from .config import MountConfig
from .diskcache import DiskCache
from .operations import Operations
from .packed import PackedLayers
from .reader import DEFAULT_MEMORY, WINDOW_CAP, ChunkReader
from .sources import RegistrySource
from .tree import Tree
from .tuning import raise_read_ahead
from .writeback import PageCacheFill

log = logging.getLogger(__name__)

# Seconds SIGTERM waits for the disk cache's write-behind before unmounting.
SIGNAL_FLUSH_TIMEOUT = 10.0
# Seconds the requests under way then have to end, before they are cancelled: a read
# waiting on a stalled registry would hold the exit for up to --timeout.
SIGNAL_GRACE = 2.0


async def check_registry(config: MountConfig) -> None:
    """Fail now, with the registry's own error, if the source cannot be listed."""
    host, root = config.root
    async with RegistryClient(host, config.options) as client:
        await client.ping()
        # Only that the root exists: the serving tree asks for signatures, once.
        await Tree(RegistrySource(client), root, refresh=config.refresh).check()


def run(config: MountConfig, ready_fd: int | None = None) -> None:
    """Serve the mount in this process (tuned by its caller: tuning.tune_process); write
    "ready" to `ready_fd` once it answers."""
    trio.run(_serve, config, ready_fd)


async def _serve(config: MountConfig, ready_fd: int | None) -> None:
    host, root = config.root
    async with RegistryClient(host, config.options) as client:
        policy = config.policy
        source = RegistrySource(client, policy.keys)
        tree = Tree(source, root, refresh=config.refresh, policy=policy, voucher=source,
                    max_inodes=config.max_inodes)
        await tree.check()
        # --cache-size 0: no disk cache. A cold read then writes nothing locally (where the
        # cache shares a disk with the data being read, that write is what bounds it), and
        # every remount fetches again.
        disk = (DiskCache(config.cache_dir, config.cache_size, config.chunk_size)
                if config.cache_size > 0 else None)
        # The memory budget holds the read-ahead window, the chunk being read and the
        # one before it (prefetch.py), whatever the chunk size (with less, prefetched
        # chunks would be evicted before use).
        memory = max(DEFAULT_MEMORY, WINDOW_CAP + 2 * config.chunk_size)
        ranges: DirectRanges | MirroredRanges = DirectRanges(client)
        if client.mirrors is not None:
            ranges = MirroredRanges(ranges, client.mirrors)
        reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=config.chunk_size,
                             memory_bytes=memory, disk=disk,
                             fetch_timeout=config.options.timeout, verify=config.verify)
        if isinstance(ranges, MirroredRanges):
            reader.distrust = ranges.distrust
        # Compressed packed layers are unpacked beside the disk cache, within its size.
        packed = PackedLayers(reader, spill_dir=config.cache_dir if disk is not None else None,
                              spill_limit=config.cache_size)
        tree.unpack = packed.expand

        def counters() -> dict[str, object]:
            return {"registry_bytes": client.bytes_received,
                    "registry_requests": client.requests_sent,
                    "direct_ranges": ranges.stats.direct,
                    "direct_fallbacks": ranges.stats.fallbacks,
                    "spans_cut": ranges.stats.cut,
                    "span_discarded_bytes": ranges.stats.discarded,
                    "listings_prefetched": tree.prefetched_listings,
                    "mirror_bytes": client.mirrors.bytes_received if client.mirrors else 0,
                    "mirror_requests": client.mirrors.requests_sent if client.mirrors else 0}

        # The disk cache is written behind the reads, from the kernel's page cache.
        fill = PageCacheFill(reader, pyfuse3.notify_retrieve) if disk is not None else None
        if fill is not None:
            reader.defer = fill.owe
        ops = Operations(tree, reader, uid=config.uid, gid=config.gid, umask=config.umask,
                         refresh=config.refresh, counters=counters, fill=fill, packed=packed)
        # A bare "galleryfs" fsname is resolved as a path when the cwd has such a folder.
        options = {f"fsname=galleryfs:{config.source}", "subtype=galleryfs", "ro",
                   "default_permissions"}
        if config.allow_other:
            options.add("allow_other")
        if config.debug:
            options.add("debug")
        try:
            pyfuse3.init(ops, config.mountpoint, options)
        except RuntimeError as exc:  # libfuse said why on stderr (the log); pyfuse3 did not
            raise GalleryError(f"cannot mount on {config.mountpoint}: {exc}") from None
        try:
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                tree.spawn = nursery
                if fill is not None:
                    await nursery.start(fill.run)
                nursery.start_soon(_watch_signals, fill, nursery.cancel_scope)
                nursery.start_soon(_announce, config, ready_fd)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            ranges.close()
            packed.close()
            if disk is not None:
                disk.close()
    log.info("%s unmounted", config.mountpoint)


async def _watch_signals(fill: PageCacheFill | None, serving: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            # The page cache goes with the mount: write what the disk cache is owed
            # first, within a grace period's reach.
            if fill is not None and fill.owed and not await fill.flush(SIGNAL_FLUSH_TIMEOUT):
                log.warning("unmounting with %d chunks not written to the disk cache",
                            fill.owed)
            pyfuse3.terminate()
            # pyfuse3.main returns once its request handlers have; end those still
            # waiting (their readers get ENOTCONN from the unmount).
            await trio.sleep(SIGNAL_GRACE)
            serving.cancel()
            return


async def _announce(config: MountConfig, ready_fd: int | None) -> None:
    # A stat through the kernel answers only once the FUSE loop serves requests.
    await trio.to_thread.run_sync(os.stat, config.mountpoint)
    raise_read_ahead(config.mountpoint)
    log.info("%s mounted on %s", config.source, config.mountpoint)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        finally:
            os.close(ready_fd)
