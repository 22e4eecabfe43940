"""The FUSE operations: a thin layer over the tree model and the chunk reader.

No network code lives here. Every operation goes through `fuse_errors`, the one place
where galleryfs exceptions become errno values (and are logged, once, with a cause).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from ..errors import (
    AuthError,
    DigestMismatch,
    GalleryError,
    InvalidReference,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    Unsigned,
    UnsupportedContent,
    first_error,
)
from . import xattrs
from .packed import Handle, MemberHandle, PackedLayers
from .reader import BlobRef, ChunkReader, NoDiskCache, Warmed
from .tree import ROOT_INODE, Kind, Node, Refused, Tree
from .verify import ChunkMismatch
from .writeback import UNMOUNT_FLUSH, PageCacheFill

log = logging.getLogger(__name__)

IMMUTABLE_TIMEOUT = 3600.0
XATTR_DIGEST = xattrs.DIGEST
XATTR_MEDIATYPE = xattrs.MEDIATYPE
XATTR_STATS = xattrs.STATS
XATTR_UNSUPPORTED = xattrs.UNSUPPORTED
XATTR_FLUSH = xattrs.FLUSH
XATTR_WARM = xattrs.WARM
FLUSH_TIMEOUT = UNMOUNT_FLUSH
# Seconds between two trims of an inode table over its bound: the kernel's forgets for
# what it was asked to let go of come in batches. A trim walks the whole table (about
# 10 us a node): the pause is also at least TRIM_PAUSE times what the last one took.
TRIM_INTERVAL = 0.5
TRIM_PAUSE = 4
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ReadOnly(GalleryError):
    """A request to change the read-only mount."""


class NotServable(UnsupportedContent):
    """A file whose layer galleryfs cannot serve (a packed layer it could not unpack)."""


def errno_for(exc: BaseException) -> int:
    if isinstance(exc, BaseExceptionGroup):
        exc = first_error(exc)
    if isinstance(exc, ReadOnly):
        return errno.EROFS
    if isinstance(exc, (NotFound, InvalidReference)):
        return errno.ENOENT
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, (AuthError, Unsigned)):
        # Unsigned: no trusted key signed the revision (--require-signed-by), or the
        # registry serves only signed artifacts: access is refused, nothing is damaged.
        return errno.EACCES
    if isinstance(exc, UnsupportedContent):
        # "Operation not supported" says what is true: the bytes exist, galleryfs
        # cannot serve this layer kind yet. EIO would suggest damage or an outage.
        return errno.EOPNOTSUPP
    if isinstance(exc, NoDiskCache):
        return errno.ENOSPC  # warm: nowhere to put it (`galleryfs warm` says which)
    # Outages, digest mismatches, odd registry answers: the data cannot be had now.
    return errno.EIO


def fuse_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_for(exc)
            op = fn.__name__
            if code in (errno.ENOENT, errno.EROFS, errno.ENOTDIR) or isinstance(
                    exc, (Refused, ChunkMismatch)):  # warned of once already, where found
                log.debug("%s: %s", op, exc)
            elif isinstance(exc, (GalleryError, OSError)):
                kind = ("digest mismatch" if isinstance(exc, DigestMismatch) else
                        "registry unreachable" if isinstance(exc, RegistryUnavailable) else
                        "registry error" if isinstance(exc, RegistryError) else
                        type(exc).__name__)
                log.warning("%s failed (%s): %s -> %s", op, kind, exc, errno.errorcode[code])
            else:
                log.exception("%s failed unexpectedly -> EIO", op)
            raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        tree: Tree,
        reader: ChunkReader,
        *,
        uid: int | None = None,
        gid: int | None = None,
        umask: int = 0o022,
        refresh: float = 30.0,
        counters: Callable[[], dict[str, object]] | None = None,
        fill: PageCacheFill | None = None,
        packed: PackedLayers | None = None,
        invalidate_entry: Callable[[int, bytes], None] | None = None,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.reader = reader
        self.packed = packed
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.umask = umask & 0o777
        self.refresh = refresh
        self.counters = counters
        self.fill = fill
        self.readdir_requests = 0
        self.nursery: trio.Nursery | None = None  # for prefetches; set by the runner
        self._files: dict[int, tuple[Handle, int]] = {}  # fh -> (handle, inode)
        self._next_fh = 1
        # How the kernel is asked to let go of an entry (tests pass their own).
        self._invalidate_entry = invalidate_entry or _invalidate_entry
        self.invalidations = 0
        self._trimming = False
        self._trim_again = False

    # ---- helpers -----------------------------------------------------------------

    def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        a = self.tree.attrs(inode)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        # Content addressed data never changes. A namespace folder's attributes expire
        # with its listing: the kernel then asks again (`revalidate`) before it trusts
        # the listing it cached.
        timeout = IMMUTABLE_TIMEOUT if a.immutable else self.tree.fresh_for(inode)
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        # A symlink's mode means nothing to the kernel; ls shows it as lrwxrwxrwx.
        entry.st_mode = a.mode if stat.S_ISLNK(a.mode) else a.mode & ~self.umask
        entry.st_nlink = a.nlink
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        entry.st_size = a.size
        entry.st_blksize = self.reader.chunk_size
        entry.st_blocks = a.blocks
        entry.st_atime_ns = a.mtime_ns
        entry.st_mtime_ns = a.mtime_ns
        entry.st_ctime_ns = a.mtime_ns
        return entry

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.counters is not None:
            out.update(self.counters())
        out.update(self.reader.snapshot())
        if self.packed is not None:
            out.update(self.packed.snapshot())
        out["open_files"] = len(self._files)
        out["readdir_requests"] = self.readdir_requests
        if self.fill is not None:
            st = self.fill.stats
            out.update(fill_owed=self.fill.owed, fill_owed_max=st.owed_max,
                       fill_chunks=st.filled, fill_from_memory=st.from_memory,
                       fill_dropped=st.dropped, fill_missed=st.missed,
                       fill_s=round(st.fill_ns / 1e9, 3))
        out.update(inodes=self.tree.inode_count, inodes_peak=self.tree.inodes_peak,
                   inodes_max=self.tree.max_inodes, inodes_dropped=self.tree.inodes_dropped,
                   inode_invalidations=self.invalidations)
        return out

    # ---- bounding the inode table --------------------------------------------------

    def trim(self) -> None:
        """Trim the tree's inode table; ask the kernel to let go of what it names."""
        for parent, name in self.tree.trim():
            self.invalidations += 1
            try:
                self._invalidate_entry(parent, os.fsencode(name))
            except OSError as exc:  # the kernel no longer knows it: nothing to let go of
                log.debug("invalidating %s: %s", name, exc)

    def _want_trim(self) -> None:
        """Trim soon if the table is over its bound: at once without a nursery (tests),
        else in the background, at most every TRIM_INTERVAL seconds."""
        if not self.tree.over_limit:
            return
        if self.nursery is None:
            self.trim()
        elif self._trimming:
            self._trim_again = True
        else:
            self._trimming = True
            self.nursery.start_soon(self._trim_loop)

    async def _trim_loop(self) -> None:
        try:
            while True:
                self._trim_again = False
                started = time.perf_counter()
                try:
                    self.trim()
                except Exception:  # a bug here must not take the mount down with it
                    log.exception("trimming the inode table failed")
                took = time.perf_counter() - started
                await trio.sleep(max(TRIM_INTERVAL, TRIM_PAUSE * took))
                if not (self._trim_again and self.tree.over_limit):
                    return
        finally:
            self._trimming = False

    # ---- names -------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        try:  # counted (so not dropped) from here; uncounted if no entry is sent
            await self.tree.revalidate(node.inode)
            entry = self._entry(node.inode)
        except BaseException:
            self.tree.forget(node.inode, 1)
            raise
        self._want_trim()
        return entry

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        await self.tree.revalidate(inode)
        return self._entry(inode)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            self.tree.forget(inode, n)
        self._want_trim()

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self.tree.readlink(inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # Declining opendir (Linux >= 5.1) ends opendir/releasedir requests and makes the
        # kernel cache each listing it reads, until the folder's attributes expire and
        # its mtime has moved: a warm `ls -R` never reaches the daemon. galleryfs's
        # build of pyfuse3 then hands readdir the folder's inode (mount/requirements.py).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # `fh` is the folder's inode (opendir declined). A refresh only at the start of a
        # pass keeps the offsets of a listing read in several requests valid.
        self.readdir_requests += 1
        entries = await self.tree.listdir(fh, refresh=start_id == 0)
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            # The kernel takes a reference to each entry of a readdirplus reply (one
            # it cannot use, it forgets), none to one that did not fit.
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(inode), i + 1):
                break
            self.tree.count_lookup(inode)
        self._want_trim()

    # ---- data --------------------------------------------------------------------

    def _file(self, inode: int) -> Node:
        node = self.tree.get(inode)
        if node.kind is not Kind.FILE or node.file is None:
            raise NotFound(f"inode {inode} is not a file")
        if not node.file.servable:
            # Refused at open, so a reader gets a clear error before any byte rather
            # than EIO in the middle of a copy.
            raise NotServable(f"{self.tree.display_path(inode)}: {node.file.reason}")
        return node

    def _blob(self, node: Node) -> BlobRef:
        assert node.file is not None
        # The size and table are this revision's claims: the reader serves only bytes
        # that match them, and caches under them.
        return BlobRef(node.repo, node.file.digest, node.file.size, node.file.table,
                       label=self.tree.display_path(node.inode))

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise ReadOnly("open for writing")
        node = self._file(inode)
        assert node.file is not None
        fh = self._next_fh
        self._files[fh] = (await self._open(node, inode), inode)
        self.tree.opened(inode)
        self._next_fh += 1
        # Immutable content: let the kernel keep its page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _open(self, node: Node, inode: int) -> Handle:
        assert node.file is not None
        if node.file.member is not None:
            if self.packed is None:  # (members come from PackedLayers: cannot happen)
                raise NotServable(f"{self.tree.display_path(inode)}: no packed layer reader")
            # A file inside a packed layer: a range of the layer (or of its unpacked tar).
            handle = self.packed.open(node.repo, node.file, self.tree.display_path(inode),
                                      self.nursery)
            if self.fill is not None and isinstance(handle, MemberHandle):
                # Its pages hold a range of the layer blob, which the disk cache keeps.
                self.fill.opened(handle.inner.blob, inode, handle.offset, handle.size)
            return handle
        blob = self._blob(node)
        if self.fill is not None:
            self.fill.opened(blob, inode)
        return self.reader.open(blob, self.nursery)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._files[fh][0].read(off, size)

    @fuse_errors
    async def release(self, fh: int) -> None:
        entry = self._files.pop(fh, None)
        if entry is not None:
            entry[0].close()
            self.tree.closed(entry[1])

    async def retrieve_reply(self, cookie: int, inode: int, offset: int, data: bytes) -> None:
        if self.fill is not None:
            await self.fill.retrieve_reply(cookie, inode, offset, data)

    # ---- extended attributes -----------------------------------------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        node = self.tree.get(inode)
        out: dict[bytes, bytes] = {}
        if inode == ROOT_INODE:
            out[XATTR_STATS] = json.dumps(self.stats(), sort_keys=True).encode()
        if node.kind is Kind.FILE and node.file is not None:
            out[XATTR_DIGEST] = node.file.digest.encode()
            out[XATTR_MEDIATYPE] = node.file.media_type.encode()
            if not node.file.servable:
                out[XATTR_UNSUPPORTED] = node.file.reason.encode()
        elif node.kind in (Kind.REVISION, Kind.TAG):
            out[XATTR_DIGEST] = node.digest.encode()
        return out

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == XATTR_FLUSH:
            done = self.fill is None or await self.fill.flush(FLUSH_TIMEOUT)
            # owed: chunks the disk cache will not get (left, or given up by the flush)
            owed = self.fill.owed + self.fill.flush_missed if self.fill else 0
            return json.dumps({"done": done, "owed": owed}).encode()
        if name == XATTR_WARM and self.tree.get(inode).kind is Kind.FILE:
            node = self._file(inode)
            assert node.file is not None
            if node.file.member is None:
                warmed = await self.reader.warm(self._blob(node))
            else:
                warmed = await self._warm_member(node, inode)
            return json.dumps(dataclasses.asdict(warmed), separators=(",", ":")).encode()
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def _warm_member(self, node: Node, inode: int) -> Warmed:
        """A file inside a packed layer: read through, so its part of the layer goes the
        way any read's does (verified, then to the disk cache behind the reads)."""
        assert node.file is not None
        before = self.reader.fetcher.stats.fetched_bytes
        handle = await self._open(node, inode)
        try:
            step = self.reader.chunk_size
            for offset in range(0, node.file.size, step):
                await handle.read(offset, min(step, node.file.size - offset))
        finally:
            handle.close()
        return Warmed(chunks=math.ceil(node.file.size / step) if node.file.size else 0,
                      fetched=0, bytes=self.reader.fetcher.stats.fetched_bytes - before)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return sorted(self._xattrs(inode))

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = self.reader.chunk_size
        st.f_frsize = 512
        st.f_blocks = st.f_bfree = st.f_bavail = 0
        st.f_files = self.tree.inode_count
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # ---- refused: the mount is read-only -------------------------------------------

    async def _refuse(self, *args: Any) -> Any:
        raise ReadOnly("the galleryfs mount is read-only")

    _refused = fuse_errors(_refuse)
    setattr = mknod = mkdir = unlink = rmdir = symlink = _refused
    rename = link = create = write = setxattr = removexattr = _refused


def _invalidate_entry(parent: int, name: bytes) -> None:
    # Queued to pyfuse3's notify thread: a synchronous invalidation from a request
    # handler could wait on the folder lock that very request holds.
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
