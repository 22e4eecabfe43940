"""The FUSE operations: a thin layer over the tree model and the chunk reader.

No network code lives here. Every operation goes through `fuse_errors`, the one place
where galleryfs exceptions become errno values (and are logged, once, with a cause).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
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
from .reader import BlobHandle, BlobRef, ChunkReader
from .tree import ROOT_INODE, Kind, Refused, Tree
from .verify import ChunkMismatch
from .writeback import UNMOUNT_FLUSH, PageCacheFill

log = logging.getLogger(__name__)

IMMUTABLE_TIMEOUT = 3600.0
XATTR_DIGEST = xattrs.DIGEST
XATTR_MEDIATYPE = xattrs.MEDIATYPE
XATTR_STATS = xattrs.STATS
XATTR_UNSUPPORTED = xattrs.UNSUPPORTED
XATTR_FLUSH = xattrs.FLUSH
FLUSH_TIMEOUT = UNMOUNT_FLUSH
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ReadOnly(GalleryError):
    """A request to change the read-only mount."""


class NotServable(UnsupportedContent):
    """A file whose layer galleryfs cannot serve yet (a packed tar layer)."""


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
        refresh: float = 30.0,
        counters: Callable[[], dict[str, object]] | None = None,
        fill: PageCacheFill | None = None,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.reader = reader
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.refresh = refresh
        self.counters = counters
        self.fill = fill
        self.readdir_requests = 0
        self.nursery: trio.Nursery | None = None  # for prefetches; set by the runner
        self._files: dict[int, BlobHandle] = {}
        self._next_fh = 1

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
        entry.st_mode = a.mode
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
        out["open_files"] = len(self._files)
        out["readdir_requests"] = self.readdir_requests
        if self.fill is not None:
            st = self.fill.stats
            out.update(fill_owed=self.fill.owed, fill_owed_max=st.owed_max,
                       fill_chunks=st.filled, fill_from_memory=st.from_memory,
                       fill_fetched=st.fetched, fill_missed=st.missed,
                       fill_s=round(st.fill_ns / 1e9, 3))
        out["inodes"] = self.tree.inode_count
        return out

    # ---- names -------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        await self.tree.revalidate(node.inode)
        return self._entry(node.inode)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        await self.tree.revalidate(inode)
        return self._entry(inode)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            self.tree.forget(inode, n)

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
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(inode), i + 1):
                break
            self.tree.count_lookup(inode)

    # ---- data --------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise ReadOnly("open for writing")
        node = self.tree.get(inode)
        if node.kind is not Kind.FILE or node.file is None:
            raise NotFound(f"inode {inode} is not a file")
        if not node.file.servable:
            # Refused at open, so a reader gets a clear error before any byte rather
            # than EIO in the middle of a copy.
            raise NotServable(f"{self.tree.display_path(inode)}: {node.file.reason}")
        # The size and table are this revision's claims: the reader serves only bytes
        # that match them, and caches under them.
        blob = BlobRef(node.repo, node.file.digest, node.file.size, node.file.table,
                       label=self.tree.display_path(inode))
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = self.reader.open(blob, self.nursery)
        if self.fill is not None:
            self.fill.opened(blob, inode)
        # Immutable content: let the kernel keep its page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._files[fh].read(off, size)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            handle.close()

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
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

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
